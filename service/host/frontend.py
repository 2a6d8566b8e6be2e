"""One front-end process: REST (uvicorn) and gRPC on the host's shared ports, over a RemotePool.

Started by the inference host with the ``spawn`` method (a fresh interpreter: no copy of the
host's torch threads or CUDA state). It dies with the host: ``PR_SET_PDEATHSIG`` asks the
kernel for SIGKILL when the host exits, and the pool's reader exits the process when the
pipe to the host closes (covers the window before the prctl and non-Linux kernels).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from ditepose.service.core.serving import Serving
from ditepose.service.core.settings import Settings
from ditepose.service.host.admission import SharedAdmission, SharedCounts
from ditepose.service.host.remote import RemotePool
from ditepose.service.host.slots import SlotArena

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux); exit now if the
    parent is already gone (it may have died before the prctl took effect)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent_pid:
        os._exit(1)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT, for uvicorn to listen on: the kernel spreads the
    host's connections over every front-end bound to the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


PROCESS_HEADER = "x-ditepose-api-process"


class ProcessHeader:
    """Names the front-end that answered (``api-<index>/<pid>``) in a response header: with N
    processes behind one port, logs and bug reports can say which one served a request."""

    def __init__(self, app: Any, value: str) -> None:
        self.app = app
        self.header = (PROCESS_HEADER.encode(), value.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


JOBS_REFUSED = ("embedded evaluation jobs do not run with api_processes > 1 (the pool lives in the inference "
                "host); set redis_url to run them on `ditepose worker` processes, or serve with api_processes=1")


def run_frontend(
    index: int, conn: Connection, arena_name: str, slots: int, slot_bytes: int, counts: SharedCounts,
    settings: Settings, host_pid: int, rest_port: int, grpc_port: int | None,
) -> None:
    """The front-end process's main: serve until SIGTERM (from the host) or the host's exit."""
    die_with_parent(host_pid)
    import torch

    # A front-end's tensor work is copies into and out of its slots: torch's intra-op pool would
    # only add hand-offs and spinning threads on the cores the front-ends need.
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s api-{index} %(name)s: %(message)s")
    import uvicorn

    from ditepose.service.grpc.server import GrpcServer
    from ditepose.service.http.app import create_app

    settings = settings.model_copy(update={"port": rest_port, "grpc_port": grpc_port or 0})
    arena = SlotArena.attach(arena_name, slots, slot_bytes)
    pool = RemotePool(conn, arena, settings.request_timeout_s, on_host_lost=lambda: os._exit(0)).start()
    # This front-end's shared objects, REST and gRPC alike; the in-flight count is the host's.
    serving = Serving.create(settings, SharedAdmission(counts, index, settings.resolved_max_in_flight,
                                                       settings.retry_after_s))
    service = serving.attach(pool)
    app = create_app(settings, serving, jobs_unavailable=JOBS_REFUSED if settings.redis_url is None else None)
    app.add_middleware(ProcessHeader, value=f"api-{index}/{os.getpid()}")
    grpc_server = None
    if grpc_port is not None:
        grpc_server = GrpcServer(settings, service, serving.metrics.registry)
        grpc_server.reuse_port = True
        grpc_server.start()
    sock = reuseport_socket(settings.host, rest_port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))

    def tell_host_when_serving() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            pool._send(("ready", index))

    threading.Thread(target=tell_host_when_serving, name="ditepose-ready", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        if grpc_server is not None:
            grpc_server.stop(grace=2.0)
        pool.stop()
