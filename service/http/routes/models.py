"""``GET /v1/models``: what is served, in which version; ``POST /v1/models/{name}/reload``: swap in a new one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ditepose.service.core.pose_service import PoseService, reload_model
from ditepose.service.http.deps import PoseServiceDep
from ditepose.service.http.routes import error_responses
from ditepose.service.http.schemas import ModelInfo, ModelsResponse, ReloadResponse

router = APIRouter(prefix="/v1", tags=["models"])


def version_state(service: PoseService, name: str) -> dict[str, Any]:
    """The watcher's version bookkeeping of ``name`` plus the version still draining, if any."""
    state = dict(service.versions.describe(name)) if service.versions is not None else {}
    draining = service.pool.retiring(name)
    state["draining_version"] = draining.version if draining is not None else None
    state.pop("served_version", None)  # the model's own version is authoritative
    state.pop("swapped_at", None)
    return state


@router.get("/models", response_model=ModelsResponse, summary="Served models, their versions and keypoint layouts",
            responses=error_responses("unavailable"))
async def list_models(service: PoseServiceDep) -> ModelsResponse:
    """Every served model with its served version, the versions available and the last load error;
    `demo_weights: true` means random weights (no checkpoint was found); `quality` is what the checkpoint
    is known to score (its recorded evaluation, or "not evaluated"): the shipped demo checkpoint says there
    that it is not usable on real photos."""
    default = service.default_model_name
    models = []
    for m in list(service.pool.models.values()):
        extra = {k: v for k, v in version_state(service, m.name).items() if v is not None}
        models.append(ModelInfo(**{**m.describe(), **extra}, default=m.name == default))
    return ModelsResponse(
        models=models,
        failed=dict(service.pool.failed_models),
        default_detector=service.default_detector,
        detectors=service.detector_status(),
    )


@router.post("/models/{name}/reload", response_model=ReloadResponse, summary="Load a model's new version now",
             responses=error_responses("unknown_model", "invalid_request", "unavailable"))
async def reload(name: str, service: PoseServiceDep) -> ReloadResponse:
    """Resolve the model's manifest in the repository again (or re-read its --model checkpoint), and
    when another version results, load it, check it on every device and swap it in while serving.
    A version that fails its checks is reported here (`error`) and the served one keeps serving."""
    outcome = await reload_model(service, name)
    state = outcome.state
    return ReloadResponse(
        name=name, swapped=outcome.swapped, previous_version=outcome.previous_version,
        served_version=state.get("served_version"), state=state.get("state") or "failed", error=state.get("error"),
        available_versions=state.get("available_versions") or [], failed_versions=state.get("failed_versions") or {},
    )
