"""Overload behaviour against a deliberately slow server.

The server is slowed legitimately for these tests only: every worker's infer callable is
wrapped to sleep ``DELAY_S`` before the real forward pass, with ``max_batch_size=1`` so each
frame costs at least that long. Everything else (pool, batcher, gRPC server) is the real path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from ditepose.proto.ditepose.v1 import pose_pb2
from ditepose.service.grpc.convert import ERROR_CODE_METADATA
from tests.service.grpc.support import (
    channel,
    config_message,
    figure_frame,
    frame_message,
    jpeg,
    make_settings,
    running_services,
    stub,
    tiny_checkpoint,
)

DELAY_S = 0.05
NO_FLIP = pose_pb2.PoseOptions(flip_test=False)


def _slow(infer):
    def run(batch):
        time.sleep(DELAY_S)
        return infer(batch)

    return run


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")
    settings = make_settings(ckpt, max_batch_size=1, queue_size=4)
    with running_services(settings, wrap_infer=_slow) as (pool, app, server), channel(server) as ch:
        yield pool, app, server, ch


def _frames(n: int) -> list[pose_pb2.StreamRequest]:
    out = []
    for i in range(n):
        img, box = figure_frame(i)
        out.append(frame_message(i, img, [box]))
    return out


def _wait_idle(server, pool, baseline: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tasks = server.tasks()
        if tasks <= baseline and server.servicer.active_streams == 0 and sum(pool.queue_depths().values()) == 0:
            return tasks
        time.sleep(0.05)
    return server.tasks()


def test_drop_oldest_reports_every_dropped_frame(services: tuple) -> None:
    frames = _frames(60)
    config = config_message(
        options=NO_FLIP, policy=pose_pb2.OVERFLOW_POLICY_DROP_OLDEST, max_in_flight=1, max_queued=1
    )
    results = list(stub(services[3]).StreamPose(iter([config, *frames]), timeout=120))
    answered = [r.sequence_number for r in results]
    dropped = [s for r in results for s in r.dropped_sequence_numbers]
    assert answered == sorted(answered)
    assert dropped, "a client 20x faster than the server must see drops"
    assert sorted(answered + dropped) == list(range(60))  # every frame answered or reported, once
    for r in results:  # drops are reported with the next answered frame, all older than it
        assert all(s < r.sequence_number for s in r.dropped_sequence_numbers)
    assert answered[-1] == 59  # the freshest frame is never dropped


def test_queue_policy_applies_backpressure_without_drops(services: tuple) -> None:
    pool, ch = services[0], services[3]
    depths: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            depths.append(sum(pool.queue_depths().values()))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        config = config_message(options=NO_FLIP, max_in_flight=2)
        results = list(stub(ch).StreamPose(iter([config, *_frames(30)]), timeout=120))
    finally:
        stop.set()
        watcher.join()
    assert [r.sequence_number for r in results] == list(range(30))
    assert not any(r.dropped_sequence_numbers for r in results)
    assert max(depths) <= 2  # never more than max_in_flight frames (1 crop each) queued


def test_client_cancel_frees_everything(services: tuple) -> None:
    pool, _app, server, ch = services
    baseline = _wait_idle(server, pool, 10**6, 1.0)
    call = stub(ch).StreamPose(iter([config_message(options=NO_FLIP, max_in_flight=4), *_frames(200)]), timeout=120)
    got = []
    for result in call:
        got.append(result.sequence_number)
        if len(got) == 3:
            assert server.tasks() > baseline  # reader, dispatcher and frames in flight
            call.cancel()
            break
    assert got == [0, 1, 2]
    assert _wait_idle(server, pool, baseline) <= baseline
    assert server.servicer.active_streams == 0
    assert sum(pool.queue_depths().values()) == 0


def test_deadline_exceeded(services: tuple) -> None:
    img, box = figure_frame(0)
    request = pose_pb2.EstimateRequest(image=jpeg(img), options=pose_pb2.PoseOptions(flip_test=True))
    request.boxes.add(x=box[0], y=box[1], width=box[2], height=box[3])
    with pytest.raises(grpc.RpcError) as info:
        stub(services[3]).Estimate(request, timeout=DELAY_S / 2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_overloaded_is_resource_exhausted(services: tuple) -> None:
    """queue_size=4 crops: 12 simultaneous 2-crop requests cannot all queue."""
    img, box = figure_frame(0)
    request = pose_pb2.EstimateRequest(image=jpeg(img))
    request.boxes.add(x=box[0], y=box[1], width=box[2], height=box[3])
    futures = [stub(services[3]).Estimate.future(request, timeout=60) for _ in range(12)]
    codes = []
    for f in futures:
        try:
            f.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert dict(err.trailing_metadata() or ()).get(ERROR_CODE_METADATA) == "overloaded"
    assert grpc.StatusCode.OK in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
