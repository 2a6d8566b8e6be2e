"""Faults: a crashing worker thread, bad checkpoints among good ones, clients that walk away."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
import torch

from ditepose import model as models
from ditepose.proto.ditepose.v1 import pose_pb2
from ditepose.service.batching.infer import make_infer
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.model_loader import load_models_isolated
from ditepose.service.core.serving import Serving, build_pool
from ditepose.service.core.settings import ModelSpec, Settings
from ditepose.service.grpc.server import start_grpc_server
from ditepose.service.http.app import create_app
from tests.reliability.support import assert_error_shape, record, serve, wait_until
from tests.service.conftest import encode, figure_image, post_pose
from tests.service.grpc.support import (
    channel,
    config_message,
    figure_frame,
    frame_message,
    running_services,
    stub,
)

BOX = [[200, 40, 240, 400]]


class InjectedCrash(BaseException):
    """Not an ``Exception``: the worker's per-batch error handling cannot absorb it, so the thread dies."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_crashing_worker_thread_fails_in_flight_and_is_replaced(tiny_ckpt: Path) -> None:
    """Test-only infer factory: the next forward pass raises a BaseException that kills the worker
    thread. That fault cannot be produced through the API; it stands for a crash below Python's
    Exception (e.g. SystemExit from an extension). The in-flight request must get a JSON 500 at once
    (not wait for its 30 s deadline) and the pool must replace the thread and keep serving."""
    settings = Settings(_env_file=None, models=[ModelSpec(name="tiny", checkpoint=tiny_ckpt)], devices="cpu",
                        grpc_enabled=False, max_delay_ms=1.0, request_timeout_s=30.0)
    crash = threading.Event()

    def factory(m, device):
        infer = make_infer(m.module, device, "fp32")

        def maybe_crash(batch: torch.Tensor) -> torch.Tensor:
            if crash.is_set():
                crash.clear()
                raise InjectedCrash("injected worker crash")
            return infer(batch)
        return maybe_crash

    pool = WorkerPool(load_models_isolated(settings.models)[0], ["cpu"], max_delay_ms=1.0, timeout_s=30.0,
                      infer_factory=factory).start()
    serving = Serving.create(settings)
    serving.attach(pool)
    image = encode(figure_image())
    try:
        with serve(create_app(settings, serving)) as url, httpx.Client(base_url=url, timeout=60) as client:
            assert post_pose(client, image, boxes=BOX).status_code == 200
            crash.set()
            started = time.monotonic()
            failed = post_pose(client, image, boxes=BOX)
            elapsed = time.monotonic() - started
            assert_error_shape(failed, 500)
            assert failed.json()["error"]["code"] == "inference_failed"
            assert "crashed" in failed.json()["error"]["message"]
            assert elapsed < 10, f"in-flight request waited {elapsed:.1f} s for a dead worker"
            assert wait_until(lambda: pool.restarts == 1 and pool.ready, timeout=10)
            assert client.get("/readyz").status_code == 200
            assert post_pose(client, image, boxes=BOX).status_code == 200
    finally:
        pool.stop()
    record("faults", "worker thread crash (BaseException in forward)", injected=1, requests_lost=0,
           detail=f"in-flight request got 500 inference_failed after {elapsed * 1000:.0f} ms; worker replaced")


def test_bad_checkpoints_are_reported_and_the_rest_serve(tiny_ckpt: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    wrong = tmp_path / "wrong_arch.pth"  # Dite-HRNet-30 weights under a Dite-HRNet-18 label
    meta = models.CheckpointMeta(arch="dite_hrnet_18", dataset="coco", num_joints=17, input_size=(64, 64))
    models.save_checkpoint(wrong, models.build_model("dite_hrnet_30", num_joints=17), meta)
    specs = [ModelSpec(name="good", checkpoint=tiny_ckpt), ModelSpec(name="corrupt", checkpoint=corrupt),
             ModelSpec(name="wrong_arch", checkpoint=wrong), ModelSpec(name="missing", checkpoint=tmp_path / "no.pth")]
    settings = Settings(_env_file=None, models=specs, devices="cpu", grpc_port=0, max_delay_ms=1.0)
    image = encode(figure_image())
    served = build_pool(settings).start()
    pool = served.pool
    serving = Serving.create(settings)
    service = serving.attach(pool, served.watcher)
    app = create_app(settings, serving)
    grpc_server = start_grpc_server(settings, service)
    try:
        with channel(grpc_server) as ch:
            grpc_listing = stub(ch).ListModels(pose_pb2.ListModelsRequest(), timeout=10)
            with pytest.raises(grpc.RpcError) as refused_rpc:
                stub(ch).Estimate(pose_pb2.EstimateRequest(image=encode(figure_image()), options=pose_pb2.PoseOptions(
                    model="corrupt")), timeout=30)
        with serve(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            listing = _check_rest_listing(client, image)
    finally:
        grpc_server.stop(grace=1.0)
        pool.stop()
    failed = listing["failed"]
    assert [m.name for m in grpc_listing.models] == ["good"]
    assert dict(grpc_listing.failed) == failed  # gRPC ListModels says the same as REST GET /v1/models
    assert refused_rpc.value.code() == grpc.StatusCode.UNAVAILABLE and "corrupt" in refused_rpc.value.details()
    record("faults", "bad checkpoints among good (corrupt, wrong arch, missing)", injected=3, requests_lost=0,
           detail="; ".join(f"{k}: {v.replace(str(tmp_path), '<tmp>')[:160]}" for k, v in sorted(failed.items()))
           + "; gRPC ListModels lists the same failures")


def _check_rest_listing(client: httpx.Client, image: bytes) -> dict:
    """REST GET /v1/models and /readyz report the failures; the good model serves, a failed one is 503."""
    listing = client.get("/v1/models").json()
    assert [m["name"] for m in listing["models"]] == ["good"]
    failed = listing["failed"]
    assert set(failed) == {"corrupt", "wrong_arch", "missing"}
    assert "not found" in failed["missing"]
    assert failed["wrong_arch"] and failed["corrupt"]
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"]["good"] == "loaded"
    assert ready.json()["models"]["corrupt"].startswith("failed: ")
    assert post_pose(client, image, boxes=BOX, model="good").status_code == 200
    refused = post_pose(client, image, boxes=BOX, model="wrong_arch")
    assert_error_shape(refused, 503)
    assert "wrong_arch" in refused.json()["error"]["message"]
    return listing


def test_only_bad_checkpoints_fail_startup_with_the_reason(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00" * 100)
    settings = Settings(_env_file=None, models=[ModelSpec(name="corrupt", checkpoint=corrupt)], devices="cpu")
    try:
        build_pool(settings)
    except RuntimeError as exc:
        assert "corrupt" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("a pool with no loadable model started")


def test_disconnecting_clients_free_queue_and_stream_tasks(tiny_ckpt: Path) -> None:
    """Slow workers (a 0.2 s sleep per batch, test-only) so clients can hang up while queued."""
    settings = Settings(_env_file=None, models=[ModelSpec(name="tiny", checkpoint=tiny_ckpt)], devices="cpu",
                        grpc_port=0, port=0, max_delay_ms=1.0, max_batch_size=2, request_timeout_s=5.0)

    def slow(infer):
        def run(batch: torch.Tensor) -> torch.Tensor:
            time.sleep(0.2)
            return infer(batch)
        return run

    image = encode(figure_image())
    with running_services(settings, wrap_infer=slow) as (pool, app, grpc_server), serve(app) as url:
        def tasks() -> int:
            return asyncio.run_coroutine_threadsafe(_count_tasks(), grpc_server.loop).result(5)
        baseline = tasks()
        hung_up = 0
        for _ in range(12):
            with httpx.Client(base_url=url, timeout=0.05) as client:
                try:
                    post_pose(client, image, boxes=BOX)
                except httpx.TimeoutException:
                    hung_up += 1
        calls = []
        ch = channel(grpc_server)
        for _ in range(3):
            frames = iter([config_message(), *[frame_message(i, figure_frame(i)[0], [figure_frame(i)[1]]) for i in range(20)]])
            call = stub(ch).StreamPose(frames, metadata=())
            next(call)
            calls.append(call)
        for call in calls:
            call.cancel()
        ch.close()
        assert wait_until(lambda: sum(pool.queue_depths().values()) == 0, timeout=settings.request_timeout_s + 5)
        assert wait_until(lambda: tasks() <= baseline, timeout=10), (tasks(), baseline)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert post_pose(client, image, boxes=BOX).status_code == 200
    record("faults", "clients disconnect mid-request / mid-stream", injected=hung_up + len(calls), requests_lost=0,
           detail=f"{hung_up} REST clients hung up, {len(calls)} gRPC streams cancelled; queue depth and "
                  f"server tasks back to baseline ({baseline})")


async def _count_tasks() -> int:
    return len(asyncio.all_tasks()) - 1
