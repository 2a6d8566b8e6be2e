"""``GET /v1/models``: what is served."""

from __future__ import annotations

from fastapi import APIRouter

from ditepose.service.http.deps import PoseServiceDep
from ditepose.service.http.routes import error_responses
from ditepose.service.http.schemas import ModelInfo, ModelsResponse

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelsResponse, summary="Served models and their keypoint layouts",
            responses=error_responses("unavailable"))
async def list_models(service: PoseServiceDep) -> ModelsResponse:
    """Every served model; `demo_weights: true` means random weights (no checkpoint was found)."""
    default = service.settings.default_model_name
    return ModelsResponse(
        models=[ModelInfo(**m.describe(), default=m.name == default) for m in service.pool.models.values()],
        failed=dict(service.pool.failed_models),
        default_detector=service.default_detector,
        detectors=service.detector_status(),
    )
