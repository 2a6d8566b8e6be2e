"""Liveness, readiness and Prometheus metrics (no API key: probes and scrapers call them)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ditepose.service.batching.interface import InferencePool
from ditepose.service.core.repository_watcher import ModelRepositoryWatcher
from ditepose.service.http.deps import ContextDep
from ditepose.service.http.routes.jobs import jobs_readiness
from ditepose.service.http.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "Not ready (models loading or a worker died)."}},
    summary="Readiness: models loaded and every worker alive",
)
async def readyz(context: ContextDep) -> JSONResponse:
    pool = context.pool
    if pool is None:
        body = ReadyResponse(ready=False, models={}, workers=[], queue_depth={})
    else:
        body = ReadyResponse(
            ready=pool.ready,
            models={
                **{name: "loaded" for name in pool.models},
                **{name: f"failed: {why}" for name, why in pool.failed_models.items()},
            },
            workers=pool.worker_status(),
            queue_depth=pool.queue_depths(),
            model_versions=_model_versions(pool, context.service.versions if context.service is not None else None),
        )
    if context.service is not None:
        body.detectors = context.service.detector_status()
    body.jobs = await asyncio.to_thread(jobs_readiness, context)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


def _model_versions(pool: InferencePool, watcher: ModelRepositoryWatcher | None) -> dict[str, dict[str, Any]]:
    """Each model's served version and version state (a rejected new version is reported here)."""
    out = {}
    for name in sorted({*pool.models, *(watcher.states if watcher is not None else ())}):
        state = watcher.describe(name) if watcher is not None else {}
        model = pool.models.get(name)
        out[name] = {"served_version": model.version if model is not None else None,
                     "state": state.get("state", "serving" if model is not None else "failed"),
                     "error": state.get("error")}
    return out


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(context: ContextDep) -> Response:
    return Response(generate_latest(context.metrics.registry), media_type=CONTENT_TYPE_LATEST)
