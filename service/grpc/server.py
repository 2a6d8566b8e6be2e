"""gRPC front-end (grpc.aio) on the SAME worker pool and batchers as the REST API.

``start_grpc_server(settings, service)`` runs the server on its own event loop in a
background thread and returns a :class:`GrpcServer` handle with a blocking ``stop(grace)``,
so :func:`ditepose.service.server.run_servers` can start it next to uvicorn. REST and gRPC
requests go through one :class:`~ditepose.service.core.pose_service.PoseService` and meet in
the same batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from ditepose.proto.ditepose.v1 import pose_pb2, pose_pb2_grpc
from ditepose.service.core.errors import ServiceError
from ditepose.service.core.pose_service import PoseRequest, PoseResult, PoseService, reload_model
from ditepose.service.core.security import api_key_accepted
from ditepose.service.core.settings import Settings
from ditepose.service.grpc.convert import (
    ERROR_CODE_METADATA,
    estimate_response,
    model_info,
    request_from_proto,
    status_of,
)
from ditepose.service.grpc.metrics import GrpcMetrics
from ditepose.service.grpc.stream import StreamOptions, StreamSession

log = logging.getLogger(__name__)

SERVICE_NAME = pose_pb2.DESCRIPTOR.services_by_name["PoseService"].full_name
T = TypeVar("T")


async def abort_with(context: grpc.aio.ServicerContext, error: ServiceError) -> NoReturn:
    """End the call with the error's gRPC status; the stable code (and a Retry-After, when the
    error has one) travel in trailing metadata."""
    metadata = [(ERROR_CODE_METADATA, error.code)]
    if "Retry-After" in error.headers:
        metadata.append(("retry-after", error.headers["Retry-After"]))
    await context.abort(status_of(error), error.message, trailing_metadata=tuple(metadata))
    raise AssertionError("unreachable")  # context.abort raises


class PoseServicer(pose_pb2_grpc.PoseServiceServicer):
    """The ``ditepose.v1.PoseService`` implementation over a :class:`PoseService`."""

    def __init__(self, service: PoseService, settings: Settings, metrics: GrpcMetrics | None = None) -> None:
        self.service = service
        self.settings = settings
        self.metrics = metrics or GrpcMetrics()
        self.api_key = settings.resolved_api_key()
        self.active_streams = 0

    # ------------------------------------------------------------------ helpers
    def _check_key(self, context: grpc.aio.ServicerContext) -> ServiceError | None:
        """``unauthorized`` unless the call's ``x-api-key`` metadata passes the service's one key check."""
        presented: list[str | None] = [value for key, value in context.invocation_metadata() or ()
                                       if key == "x-api-key" and isinstance(value, str)]
        if any(api_key_accepted(self.api_key, value) for value in presented or [None]):
            return None
        return ServiceError("unauthorized", "missing or wrong x-api-key metadata")

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        limit = self.settings.request_timeout_s
        return limit if remaining is None else max(0.0, min(limit, remaining))

    async def _run(self, request: PoseRequest, timeout_s: float) -> PoseResult:
        try:
            async with asyncio.timeout(timeout_s):  # no extra task per request, unlike wait_for
                return await self.service.estimate(request)
        except TimeoutError as exc:
            raise ServiceError("timeout", f"no answer within {timeout_s:.3f} s") from exc

    async def _unary(
        self, rpc: str, context: grpc.aio.ServicerContext, answer: Callable[[], Awaitable[T]]
    ) -> T:
        """A timed unary call: the key check, then ``answer``; its latency is observed under its
        status, and a :class:`ServiceError` ends the call with its gRPC status."""
        started = time.perf_counter()
        try:
            if (denied := self._check_key(context)) is not None:
                raise denied
            result = await answer()
        except ServiceError as exc:
            self.metrics.observe_call(rpc, status_of(exc).name, time.perf_counter() - started)
            await abort_with(context, exc)
        self.metrics.observe_call(rpc, "OK", time.perf_counter() - started)
        return result

    # --------------------------------------------------------------------- RPCs
    async def Estimate(
        self, request: pose_pb2.EstimateRequest, context: grpc.aio.ServicerContext
    ) -> pose_pb2.EstimateResponse:
        async def estimate() -> PoseResult:
            with self.service.admission.slot("grpc"):  # RESOURCE_EXHAUSTED at once past the in-flight limit
                pose_request = request_from_proto(request.image, request.boxes, request.options)
                return await self._run(pose_request, self._timeout(context))

        return estimate_response(await self._unary("Estimate", context, estimate))

    async def ListModels(
        self, request: pose_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pose_pb2.ListModelsResponse:
        if (denied := self._check_key(context)) is not None:
            await abort_with(context, denied)
        default = self.service.default_model_name
        watcher = self.service.versions
        models = [model_info(m, m.name == default, watcher.describe(m.name) if watcher is not None else None)
                  for m in list(self.service.pool.models.values())]
        failed = dict(self.service.pool.failed_models)
        return pose_pb2.ListModelsResponse(models=models, failed=failed)

    async def ReloadModel(
        self, request: pose_pb2.ReloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pose_pb2.ReloadModelResponse:
        outcome = await self._unary("ReloadModel", context, lambda: reload_model(self.service, request.name))
        default = self.service.default_model_name
        model = self.service.pool.models.get(request.name)
        info = (model_info(model, model.name == default, outcome.state) if model is not None
                else pose_pb2.ModelInfo(name=request.name, state=outcome.state.get("state") or "failed",
                                        error=outcome.state.get("error") or ""))
        return pose_pb2.ReloadModelResponse(model=info, swapped=outcome.swapped,
                                            previous_version=outcome.previous_version or "")

    async def StreamPose(
        self, request_iterator: AsyncIterator[pose_pb2.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pose_pb2.StreamResult]:
        try:
            if (denied := self._check_key(context)) is not None:
                raise denied
            session = await self._open_stream(request_iterator)
        except ServiceError as exc:
            self.metrics.observe_call("StreamPose", status_of(exc).name)
            await abort_with(context, exc)
        self.active_streams += 1
        self.metrics.streams.inc()
        code = "CANCELLED"
        try:
            async for result in session.results(request_iterator):
                yield result
            code = "OK"
        except ServiceError as exc:
            code = status_of(exc).name
            await abort_with(context, exc)
        finally:
            self.active_streams -= 1
            self.metrics.streams.dec()
            self.metrics.observe_call("StreamPose", code)
            self.metrics.observe_frames(session.frames_out, session.frames_failed, session.frames_dropped)

    async def _open_stream(self, requests: AsyncIterator[pose_pb2.StreamRequest]) -> StreamSession:
        try:
            first = await anext(aiter(requests))
        except StopAsyncIteration as exc:
            raise ServiceError("invalid_request", "the stream ended before its config message") from exc
        if first.WhichOneof("kind") != "config":
            raise ServiceError("invalid_request", "the first message of a stream must be a StreamConfig")
        opts = StreamOptions.from_proto(first.config)
        probe = request_from_proto(b"", (), opts.options)  # validate options before any frame arrives
        model = self.service.resolve_model(probe.model)
        self.service.pipeline(model, probe.flip_test, probe.decoder)
        self.service.detector(probe.detector)
        timeout_s = self.settings.request_timeout_s

        async def run_frame(request: PoseRequest) -> PoseResult:
            # each frame in flight holds an admission slot, like a unary request
            with self.service.admission.slot("stream"):
                return await self._run(request, timeout_s)

        return StreamSession(opts, run_frame, model.spec.sigmas)


class GrpcServer:
    """A grpc.aio server on its own event loop thread; ``stop`` blocks until it is down."""

    def __init__(
        self, settings: Settings, service: PoseService, registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.pool = service.pool
        self.metrics = GrpcMetrics(registry)
        self.servicer = PoseServicer(self.service, settings, self.metrics)
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._health_task: asyncio.Task | None = None
        self._stopped = False
        # SO_REUSEPORT: on for the front-ends of --api-processes, which share the port; off
        # otherwise, so a port someone else holds is an error, not a silent split of traffic.
        self.reuse_port = False

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::", "") else self.settings.host
        return f"{host}:{self.port}"

    async def _start(self) -> None:
        max_message = self.settings.max_upload_bytes + 1024 * 1024
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", max_message), ("grpc.so_reuseport", int(self.reuse_port))]
        )
        pose_pb2_grpc.add_PoseServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = server.add_insecure_port(f"{self.settings.host}:{self.settings.grpc_port}")
        if port == 0:
            raise OSError(f"cannot bind gRPC to {self.settings.host}:{self.settings.grpc_port}")
        await server.start()
        self._server, self.port = server, port
        await self._publish_health()
        self._health_task = asyncio.get_running_loop().create_task(self._watch_pool())

    async def _publish_health(self) -> None:
        serving = self.pool.ready and not self._stopped
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_pool(self, period_s: float = 1.0) -> None:
        """Health follows the workers: NOT_SERVING while the pool is not ready (e.g. a dead worker)."""
        while not self._stopped:
            await asyncio.sleep(period_s)
            await self._publish_health()

    def start(self) -> GrpcServer:
        started: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start())
            except BaseException as exc:
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="ditepose-grpc", daemon=True)
        self._thread.start()
        started.result(timeout=60)
        log.info("gRPC serving on %s", self.address)
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        """Run ``coro`` on the server's loop from another thread (tests, shutdown)."""
        if self.loop is None:
            raise RuntimeError("the gRPC server is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float | None = 2.0) -> None:
        """Refuse new calls, let running ones finish for ``grace`` seconds, then stop the loop."""
        if self._stopped or self.loop is None or self._server is None:
            return
        self._stopped = True

        async def shutdown() -> None:
            if self._health_task is not None:
                self._health_task.cancel()
            await self.health.enter_graceful_shutdown()
            assert self._server is not None
            await self._server.stop(grace)

        try:
            self.call(shutdown(), timeout=(grace or 0) + 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self._thread is not None:
                self._thread.join(10)

    def tasks(self) -> int:
        """Tasks alive on the server loop other than the caller (leak checks in tests)."""

        async def count() -> int:
            me = asyncio.current_task()
            return sum(1 for t in asyncio.all_tasks() if t is not me and not t.done())

        return self.call(count())

    def __enter__(self) -> GrpcServer:
        return self if self.port is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_grpc_server(
    settings: Settings, service: PoseService, registry: CollectorRegistry | None = None,
) -> GrpcServer:
    """Start gRPC beside REST over the same pose service (its pool, pipelines and admission count),
    with its metrics in ``registry`` (the composition root's: gRPC metrics on the same /metrics page)."""
    return GrpcServer(settings, service, registry).start()
