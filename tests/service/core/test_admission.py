"""Early admission control: the in-flight count, its ASGI middleware, and the shared REST/gRPC limit.

The middleware tests at the ASGI level drive it with small inner apps (to raise, or to be
cancelled, on purpose); everything else runs the real app on a real uvicorn and gRPC server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch

from ditepose.proto.ditepose.v1 import pose_pb2
from ditepose.service.core.admission import Admission
from ditepose.service.core.errors import ServiceError
from ditepose.service.core.settings import ModelSpec, Settings
from ditepose.service.grpc.convert import ERROR_CODE_METADATA
from ditepose.service.http.deps import context_of
from ditepose.service.http.middleware import AdmissionControl
from tests.reliability.support import serve, wait_until
from tests.service.conftest import assert_error, encode, figure_image, post_pose
from tests.service.grpc.support import channel, make_settings, running_services, stub, tiny_checkpoint
from tests.service.http.raw_http import multipart_prefix, read_response, start_upload

BOX = [[40, 10, 80, 100]]
POSE = frozenset({("POST", "/v1/pose")})


# ------------------------------------------------------------------ Admission
def test_admission_counts_and_refuses_past_the_limit() -> None:
    admission = Admission(2, retry_after_s=3)
    assert admission.try_acquire("rest") and admission.try_acquire("grpc")
    assert not admission.try_acquire("rest") and not admission.try_acquire("grpc")
    assert admission.in_flight == 2 and admission.rejected == {"rest": 1, "grpc": 1}
    error = admission.overloaded()
    assert error.code == "overloaded" and error.status == 429 and error.headers == {"Retry-After": "3"}
    admission.release()
    admission.release()
    assert admission.in_flight == 0 and admission.peak == 2
    with pytest.raises(RuntimeError, match="twice"):
        admission.release()
    with pytest.raises(ValueError):
        Admission(0)


def test_slot_is_released_when_the_block_raises() -> None:
    admission = Admission(1)
    with pytest.raises(KeyError), admission.slot("grpc"):
        assert admission.in_flight == 1
        with pytest.raises(ServiceError) as refused, admission.slot("grpc"):
            pass  # pragma: no cover
        assert refused.value.code == "overloaded"
        raise KeyError("boom")
    assert admission.in_flight == 0


def test_default_limit_follows_queue_and_batch_sizes() -> None:
    one = Settings(_env_file=None, queue_size=8, max_batch_size=4, workers_per_device=1)
    assert one.resolved_max_in_flight == (8 + 4) // 2
    two = Settings(_env_file=None, models=[ModelSpec(name="a"), ModelSpec(name="b")], queue_size=512,
                   max_batch_size=32, workers_per_device=2)
    assert two.resolved_max_in_flight == 2 * (512 + 2 * 32) // 2
    assert Settings(_env_file=None, max_in_flight=3).resolved_max_in_flight == 3
    assert Settings(_env_file=None, queue_size=1, max_batch_size=1, workers_per_device=1).resolved_max_in_flight == 1
    auto = Settings(_env_file=None, devices="cpu", queue_size=8, max_batch_size=4)  # a worker per core
    assert auto.resolved_max_in_flight == (8 + auto.resolved_workers_per_device() * 4) // 2


def test_cpu_defaults_one_single_threaded_worker_per_core(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    cpu = Settings(_env_file=None, devices="cpu")
    assert (cpu.resolved_workers_per_device(), cpu.resolved_torch_threads()) == (4, 1)
    two = Settings(_env_file=None, devices="cpu", workers_per_device=2)
    assert (two.resolved_workers_per_device(), two.resolved_torch_threads()) == (2, 2)
    pinned = Settings(_env_file=None, devices="cpu", workers_per_device=1, torch_threads=3)
    assert (pinned.resolved_workers_per_device(), pinned.resolved_torch_threads()) == (1, 3)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert Settings(_env_file=None, devices="cpu").resolved_workers_per_device() == 8  # capped
    gpu = Settings(_env_file=None, devices="cuda:0,cuda:1")
    assert (gpu.resolved_workers_per_device(), gpu.resolved_torch_threads()) == (1, None)


# ------------------------------------------------------------ the ASGI middleware
async def _call(middleware: AdmissionControl, path: str = "/v1/pose") -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    await middleware(scope, receive, send)
    return sent


def test_middleware_releases_on_exception_and_cancellation() -> None:
    admission = Admission(1)
    entered = asyncio.Event()

    async def raising(scope, receive, send) -> None:
        assert admission.in_flight == 1
        raise RuntimeError("handler bug")

    async def hanging(scope, receive, send) -> None:
        entered.set()
        await asyncio.sleep(3600)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="handler bug"):
            await _call(AdmissionControl(raising, admission, POSE))
        assert admission.in_flight == 0
        task = asyncio.ensure_future(_call(AdmissionControl(hanging, admission, POSE)))
        await entered.wait()
        assert admission.in_flight == 1
        shed = await _call(AdmissionControl(hanging, admission, POSE))  # full: answered, inner app not called
        assert shed[0]["status"] == 429 and (b"retry-after", b"1") in shed[0]["headers"]
        assert json.loads(shed[1]["body"])["error"]["code"] == "overloaded"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert admission.in_flight == 0

    asyncio.run(main())


def test_middleware_ignores_other_routes() -> None:
    admission = Admission(1)
    admission.try_acquire("rest")
    calls = []

    async def inner(scope, receive, send) -> None:
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = asyncio.run(_call(AdmissionControl(inner, admission, POSE), path="/v1/models"))
    assert calls == ["/v1/models"] and sent[0]["status"] == 200 and admission.in_flight == 1


# ------------------------------------------------- the real app, REST and gRPC
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")


class Faults:
    """Test-only switches in the workers' forward pass: fail a batch, or slow it down."""

    def __init__(self) -> None:
        self.fail = threading.Event()
        self.delay_s = 0.0

    def wrap(self, infer):
        def run(batch: torch.Tensor) -> torch.Tensor:
            if self.delay_s:
                threading.Event().wait(self.delay_s)
            if self.fail.is_set():
                raise RuntimeError("injected inference failure")
            return infer(batch)
        return run


@pytest.fixture(scope="module")
def live(tiny: Path) -> Iterator[tuple]:
    """Pool + REST (uvicorn) + gRPC on one PoseService, at most ONE request in flight."""
    faults = Faults()
    settings = make_settings(tiny, max_in_flight=1, request_timeout_s=1.0, retry_after_s=2)
    with running_services(settings, wrap_infer=faults.wrap) as (_pool, app, grpc_server), serve(app) as url, \
            channel(grpc_server) as ch:
        yield app, url, ch, faults


def _idle(app) -> bool:
    return wait_until(lambda: context_of(app).admission.in_flight == 0, timeout=10)


def test_slot_is_released_on_every_rest_outcome(live: tuple) -> None:
    app, url, _ch, faults = live
    image = encode(figure_image(160, 120))
    with httpx.Client(base_url=url, timeout=30) as client:
        assert post_pose(client, image, boxes=BOX).status_code == 200
        assert _idle(app)
        as_json = client.post("/v1/pose", json={"image": base64.b64encode(image).decode(), "boxes": BOX})
        assert as_json.status_code == 200 and _idle(app)
        assert_error(post_pose(client, b"not an image at all", boxes=BOX), 415, "not_an_image")
        assert _idle(app)
        assert_error(post_pose(client, image, boxes=[[1, 2, 3]]), 422, "bad_boxes")
        assert _idle(app)
        assert_error(post_pose(client, image, boxes=BOX, model="nope"), 404, "unknown_model")
        assert _idle(app)
        faults.fail.set()
        try:
            assert_error(post_pose(client, image, boxes=BOX), 500, "inference_failed")
        finally:
            faults.fail.clear()
        assert _idle(app)
        faults.delay_s = 1.5
        try:
            assert_error(post_pose(client, image, boxes=BOX), 504, "timeout")
            assert _idle(app)
        finally:
            faults.delay_s = 0.0
        wait_until(lambda: sum(context_of(app).pool.queue_depths().values()) == 0, timeout=10)
        assert post_pose(client, image, boxes=BOX).status_code == 200
    assert context_of(app).admission.in_flight == 0


def test_full_service_answers_429_without_reading_the_body(live: tuple) -> None:
    """One upload that never finishes holds the only slot; further requests (multipart, JSON, and
    one waiting for 100-continue) whose bodies are never sent get 429 from their headers; hanging
    up frees the slot."""
    app, url, _ch, _faults = live
    rejected_before = dict(context_of(app).admission.rejected)
    holder = start_upload(url, 200_000, multipart_prefix())
    try:
        assert wait_until(lambda: context_of(app).admission.in_flight == 1, timeout=10)
        expect = {"Expect": "100-continue"}  # a client that waits for "100 Continue" before its body
        for content_type, sent, headers in ((None, multipart_prefix(), None),
                                            ("application/json", b'{"image": "/9j/4AAQ', None),
                                            (None, b"", expect)):
            kwargs = {"content_type": content_type} if content_type else {}
            shed = start_upload(url, 5_000_000, sent, extra_headers=headers, **kwargs)
            try:
                answer = read_response(shed, timeout=10)
            finally:
                shed.close()
            assert answer.status == 429, answer  # not "100 Continue": the body was never asked for
            assert answer.headers["retry-after"] == "2"
            body = json.loads(answer.body)
            assert body["error"]["code"] == "overloaded" and "in flight" in body["error"]["message"]
        assert context_of(app).admission.in_flight == 1
    finally:
        holder.close()  # the client hangs up mid-upload
    assert _idle(app)
    assert context_of(app).admission.rejected["rest"] == rejected_before.get("rest", 0) + 3
    with httpx.Client(base_url=url, timeout=30) as client:
        assert post_pose(client, encode(figure_image(160, 120)), boxes=BOX).status_code == 200
        metrics = client.get("/metrics").text
    assert 'ditepose_in_flight_requests 0.0' in metrics and "ditepose_in_flight_limit 1.0" in metrics
    assert 'ditepose_admission_rejected_total{transport="rest"}' in metrics
    assert 'ditepose_http_requests_total{method="POST",route="/v1/pose",status="429"}' in metrics


def test_grpc_estimate_shares_the_limit(live: tuple) -> None:
    app, url, ch, _faults = live
    image = encode(figure_image(160, 120))
    request = pose_pb2.EstimateRequest(image=image, boxes=[pose_pb2.Box(x=40, y=10, width=80, height=100)])
    holder = start_upload(url, 200_000, multipart_prefix())
    try:
        assert wait_until(lambda: context_of(app).admission.in_flight == 1, timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            stub(ch).Estimate(request, timeout=10)
    finally:
        holder.close()
    err = refused.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "in flight" in err.details() and "limit is 1" in err.details()
    trailing = dict(err.trailing_metadata() or ())
    assert trailing[ERROR_CODE_METADATA] == "overloaded" and trailing["retry-after"] == "2"
    assert context_of(app).admission.rejected["grpc"] >= 1
    assert _idle(app)
    reply = stub(ch).Estimate(request, timeout=30)
    assert len(reply.persons) == 1 and context_of(app).admission.in_flight == 0
    with pytest.raises(grpc.RpcError) as bad:
        stub(ch).Estimate(pose_pb2.EstimateRequest(image=b"junk"), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert context_of(app).admission.in_flight == 0
