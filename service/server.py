"""Run REST and gRPC over one shared worker pool: the composition root of ``ditepose serve``.

``api_processes`` 1: one process serves REST, gRPC and inference. More: this process becomes
the inference host (:mod:`ditepose.service.host.inference`) and the front-end processes serve
REST and gRPC (see docs/architecture.md, "Several API processes")."""

from __future__ import annotations

import logging
import os
from typing import Any

from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.pose_service import PoseService
from ditepose.service.core.settings import Settings

log = logging.getLogger(__name__)


def _start_grpc(settings: Settings, pool: WorkerPool, service: PoseService, registry: Any = None) -> Any | None:
    """Start gRPC on the same pool and service as REST (unless disabled)."""
    if not settings.grpc_enabled:
        return None
    from ditepose.service.grpc.server import start_grpc_server

    return start_grpc_server(settings, pool, service, registry)


def run_servers(settings: Settings, pool: WorkerPool | None = None) -> None:
    """Load models once, start the workers, serve REST (blocking) and gRPC beside it.

    ``pool``: serve this (unstarted) pool instead of one loaded from the settings (benches)."""
    if settings.api_processes > 1:
        run_host(settings, pool)
        return
    import uvicorn

    from ditepose.service.http.app import create_app
    from ditepose.service.http.deps import context_of

    pool = (pool or WorkerPool.from_settings(settings)).start()
    grpc_server = None
    try:
        app = create_app(settings, pool=pool)
        context = context_of(app)
        assert context.service is not None
        grpc_server = _start_grpc(settings, pool, context.service, context.metrics.registry)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info")
        server = uvicorn.Server(config)
        _announce(settings, pool, context.service, grpc_server.port if grpc_server is not None else None)
        server.run()
    finally:
        if grpc_server is not None:
            grpc_server.stop(grace=2.0)
        pool.stop()


def refuse_for_processes(settings: Settings) -> str | None:
    """Why ``settings`` cannot run with api_processes > 1, or None."""
    repository = getattr(settings, "model_repository", None)
    if repository:
        return (f"model_repository ({repository}) is not supported with api_processes > 1 yet: hot swaps run "
                "in one process; serve with api_processes=1")
    return None


def run_host(settings: Settings, pool: WorkerPool | None = None) -> None:
    """The inference host: the pool and N supervised front-end processes, until SIGTERM/SIGINT."""
    import signal
    import threading

    from ditepose.service.host.inference import InferenceHost

    refusal = refuse_for_processes(settings)
    if refusal is not None:
        raise SystemExit(f"ditepose serve: {refusal}")
    pool = (pool or WorkerPool.from_settings(settings)).start()
    host = None
    try:
        host = InferenceHost(settings, pool)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: host.request_stop())  # type: ignore[union-attr]
        host.start()
        served = settings.model_copy(update={"port": host.rest_port})
        _announce(served, pool, host.service, host.grpc_port, processes=host.processes)
        host.supervise()
    finally:
        if host is not None:
            host.stop()
        pool.stop()


def _announce(
    settings: Settings, pool: WorkerPool, service: PoseService, grpc_port: int | None, processes: int = 1
) -> None:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    base = f"http://{host}:{settings.port}"
    lines = [
        f"DitePose REST on {base}  (docs: {base}/docs, metrics: {base}/metrics)",
        f"  models: {', '.join(pool.models)}  devices: {', '.join(pool.devices)}",
        f"  try: curl -F image=@docs/example.jpg -F 'boxes=[[200,31,129,185]]' {base}/v1/pose   (or open {base}/ in a browser)",
    ]
    if grpc_port is not None:
        lines.append(f"DitePose gRPC on {host}:{grpc_port}  (ditepose.v1.PoseService + grpc.health.v1)")
    if processes > 1:
        lines.append(f"  {processes} API processes share these ports; this process (pid {os.getpid()}) is the "
                     "inference host")
    lines.append(f"  person detector for requests without boxes: {service.default_detector}")
    for name, status in service.detector_status().items():
        if status != "ready":
            lines.append(f"  NOTE: detector {name} {status}")
            log.warning("detector %s %s", name, status)
    if any(m.demo_weights for m in pool.models.values()):
        lines.append("  WARNING: serving RANDOM demo weights (no checkpoint found); poses are meaningless")
    print("\n".join(lines), flush=True)
