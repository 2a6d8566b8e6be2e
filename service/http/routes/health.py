"""Liveness, readiness and Prometheus metrics (no API key: probes and scrapers call them)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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
async def readyz(request: Request) -> JSONResponse:
    pool = getattr(request.app.state, "pool", None)
    if pool is None:
        body = ReadyResponse(ready=False, models={}, workers=[], queue_depth={})
    else:
        body = ReadyResponse(
            ready=pool.ready,
            models={
                **{name: "loaded" for name in pool.models},
                **{name: f"failed: {why}" for name, why in getattr(pool, "failed_models", {}).items()},
            },
            workers=[asdict(s) for s in pool.worker_status()],
            queue_depth=pool.queue_depths(),
        )
    body.jobs = await asyncio.to_thread(jobs_readiness, request.app)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
