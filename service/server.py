"""Run REST and gRPC over one shared worker pool: the composition root of ``ditepose serve``.

``api_processes`` 1: one process serves REST, gRPC and inference. More: this process becomes
the inference host (:mod:`ditepose.service.host.inference`) and the front-end processes serve
REST and gRPC (see docs/architecture.md, "Several API processes")."""

from __future__ import annotations

import logging
import os

from ditepose.service.batching.interface import InferencePool
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.pose_service import PoseService
from ditepose.service.core.serving import Serving, ServingPool, build_pool
from ditepose.service.core.settings import Settings

log = logging.getLogger(__name__)


def _serving_pool(settings: Settings, pool: WorkerPool | None) -> ServingPool:
    """The pool to serve: ``pool`` as handed in (benches; no versions managed), else the settings'."""
    return ServingPool(pool) if pool is not None else build_pool(settings)


def run_servers(settings: Settings, pool: WorkerPool | None = None) -> None:
    """Load models once, start the workers, serve REST (blocking) and gRPC beside it, both over
    the one :class:`~ditepose.service.core.serving.Serving` built here.

    ``pool``: serve this (unstarted) pool instead of one loaded from the settings (benches)."""
    if settings.api_processes > 1:
        run_host(settings, pool)
        return
    import uvicorn

    from ditepose.service.grpc.server import GrpcServer, start_grpc_server
    from ditepose.service.http.app import create_app

    served = _serving_pool(settings, pool)
    serving = Serving.create(settings)
    service = serving.attach(served.pool, served.watcher)
    served.start()
    grpc_server: GrpcServer | None = None
    try:
        app = create_app(settings, serving)
        if settings.grpc_enabled:
            grpc_server = start_grpc_server(settings, service, serving.metrics.registry)
        server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info"))
        _announce(settings, served.pool, service, grpc_server.port if grpc_server is not None else None)
        server.run()
    finally:
        if grpc_server is not None:
            grpc_server.stop(grace=2.0)
        served.stop()


def refuse_for_processes(settings: Settings) -> str | None:
    """Why ``settings`` cannot run with api_processes > 1, or None."""
    repository = settings.model_repository
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
    served = _serving_pool(settings, pool)
    # The host's pose service builds the detectors front-ends ask for, from this process's settings.
    service = Serving.create(settings).attach(served.pool, served.watcher)
    served.start()
    host: InferenceHost | None = None
    try:
        host = running = InferenceHost(settings, served.pool, service)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: running.request_stop())
        host.start()
        _announce(settings.model_copy(update={"port": host.rest_port}), served.pool, service, host.grpc_port,
                  processes=host.processes)
        host.supervise()
    finally:
        if host is not None:
            host.stop()
        served.stop()


def _announce(
    settings: Settings, pool: InferencePool, service: PoseService, grpc_port: int | None, processes: int = 1
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
