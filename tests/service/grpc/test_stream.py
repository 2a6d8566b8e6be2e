"""StreamPose against a real gRPC server (tiny 64x64 model): order, tracking, smoothing, errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ditepose.proto.ditepose.v1 import pose_pb2
from ditepose.service.grpc.convert import ERROR_CODE_METADATA, keypoints_array
from tests.service.grpc.support import config_message, figure_frame, frame_message, stub, tiny_services


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    with tiny_services(tmp_path_factory.mktemp("tiny"), max_batch_size=8) as services:
        yield services


def _frames(n: int, boxes: bool = True) -> list[pose_pb2.StreamRequest]:
    out = []
    for i in range(n):
        img, box = figure_frame(i)
        out.append(frame_message(i * 3 + 5, img, [box] if boxes else None))  # non-consecutive numbers
    return out


def _stream(ch: grpc.Channel, config: pose_pb2.StreamRequest, frames: list) -> list[pose_pb2.StreamResult]:
    return list(stub(ch).StreamPose(iter([config, *frames]), timeout=120))


def test_results_come_back_in_order_with_sequence_numbers(services: tuple) -> None:
    frames = _frames(40)
    results = _stream(services[3], config_message(max_in_flight=6), frames)
    assert [r.sequence_number for r in results] == [f.frame.sequence_number for f in frames]
    assert [r.timestamp for r in results] == [f.frame.timestamp for f in frames]
    for r in results:
        assert not r.HasField("error") and not r.dropped_sequence_numbers
        assert (r.width, r.height, r.model) == (320, 240, "tiny")
        assert len(r.persons) == 1 and len(r.persons[0].keypoints) == 17
        assert r.persons[0].track_id == 0  # tracking off


def test_concurrent_streams_share_batches(services: tuple) -> None:
    """Two streams at once: the workers see batches holding crops of both (shared batcher)."""
    import threading

    pool, ch = services[0], services[3]
    sizes: list[int] = []

    class Watch:
        def observe_batch(self, model, device, size, infer_s, queued_s, ok, background=0) -> None:
            sizes.append(size)

    pool.add_observer(Watch())
    out: dict[int, list] = {}

    def run(k: int) -> None:
        out[k] = _stream(ch, config_message(max_in_flight=4, options=pose_pb2.PoseOptions(flip_test=False)), _frames(20))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(out[0]) == len(out[1]) == 20
    assert max(sizes) > 1  # 1 crop per frame without flip: >1 means frames were batched together


def test_track_ids_stable_for_a_moving_figure_and_a_standing_one(services: tuple) -> None:
    frames = []
    for i in range(30):
        img, walker = figure_frame(i, width=480, x0=30, speed=9)
        still_img, still = figure_frame(0, width=480, x0=420, speed=0)
        img[:, 380:] = still_img[:, 380:]
        frames.append(frame_message(i, img, [walker, still]))
    config = config_message(tracking=pose_pb2.TrackingConfig(enabled=True))
    results = _stream(services[3], config, frames)
    ids = [[p.track_id for p in r.persons] for r in results]
    assert ids[0] == [1, 2]
    assert all(frame_ids == [1, 2] for frame_ids in ids), ids
    # The walker's box moved ~260 px: the same id all along.
    assert results[-1].persons[0].bbox.x - results[0].persons[0].bbox.x > 200


def test_smoothing_reduces_keypoint_jitter(services: tuple) -> None:
    frames = _frames(30)
    raw = _stream(services[3], config_message(tracking=pose_pb2.TrackingConfig(enabled=True)), frames)
    smooth_cfg = pose_pb2.SmoothingConfig(enabled=True, min_cutoff=0.5, beta=0.001)
    smooth = _stream(services[3], config_message(smoothing=smooth_cfg), frames)
    kr = np.stack([keypoints_array(r.persons[0]) for r in raw])
    ks = np.stack([keypoints_array(r.persons[0]) for r in smooth])
    np.testing.assert_allclose(ks[0], kr[0])  # the first sample passes through
    np.testing.assert_array_equal(ks[:, :, 2], kr[:, :, 2])  # scores untouched
    jitter_raw = np.abs(np.diff(kr[:, :, :2], axis=0)).mean()
    jitter_smooth = np.abs(np.diff(ks[:, :, :2], axis=0)).mean()
    assert jitter_smooth < 0.7 * jitter_raw
    assert all(r.persons[0].track_id == 1 for r in smooth)


def test_bad_frame_is_reported_and_the_stream_goes_on(services: tuple) -> None:
    frames = _frames(3)
    bad = pose_pb2.StreamRequest(frame=pose_pb2.Frame(sequence_number=99, image=b"garbage"))
    bad_box = _frames(1)[0]
    bad_box.frame.sequence_number = 100
    bad_box.frame.boxes[0].width = 0
    results = _stream(services[3], config_message(), [frames[0], bad, bad_box, *frames[1:]])
    assert [r.sequence_number for r in results] == [5, 99, 100, 8, 11]
    assert results[1].error.code == "not_an_image" and not results[1].persons
    assert results[2].error.code == "bad_boxes"
    assert not results[3].HasField("error") and len(results[3].persons) == 1


@pytest.mark.parametrize(
    ("messages", "status", "code"),
    [
        ("frame_first", grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"),
        ("unknown_model", grpc.StatusCode.NOT_FOUND, "unknown_model"),
        ("second_config", grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"),
        ("bad_smoothing", grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"),
        ("empty", grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"),
    ],
)
def test_stream_level_errors(services: tuple, messages: str, status: grpc.StatusCode, code: str) -> None:
    frame = _frames(1)[0]
    sequences = {
        "frame_first": [frame],
        "unknown_model": [config_message(options=pose_pb2.PoseOptions(model="nope")), frame],
        "second_config": [config_message(), frame, config_message()],
        "bad_smoothing": [config_message(smoothing=pose_pb2.SmoothingConfig(enabled=True, beta=-1))],
        "empty": [],
    }
    with pytest.raises(grpc.RpcError) as info:
        list(stub(services[3]).StreamPose(iter(sequences[messages]), timeout=60))
    assert info.value.code() == status
    assert dict(info.value.trailing_metadata() or ()).get(ERROR_CODE_METADATA) == code


def test_rest_and_grpc_requests_share_one_batch(tmp_path: Path) -> None:
    """One REST and one gRPC request (1 crop each) inside a 500 ms batching window: one batch of 2."""
    import json
    import threading

    from fastapi.testclient import TestClient

    from tests.service.grpc.support import jpeg

    img, box = figure_frame(3)
    data = jpeg(img)
    sizes: list[int] = []

    class Watch:
        def observe_batch(self, model, device, size, infer_s, queued_s, ok, background=0) -> None:
            sizes.append(size)

    with (tiny_services(tmp_path, max_batch_size=8, max_delay_ms=500) as (pool, app, _server, ch),
          TestClient(app) as client):
        pool.add_observer(Watch())
        rest_status: list[int] = []

        def rest() -> None:
            response = client.post(
                "/v1/pose",
                files={"image": ("a.jpg", data, "image/jpeg")},
                data={"boxes": json.dumps([box]), "flip_test": "false"},
            )
            rest_status.append(response.status_code)

        thread = threading.Thread(target=rest)
        thread.start()
        request = pose_pb2.EstimateRequest(image=data, options=pose_pb2.PoseOptions(flip_test=False))
        request.boxes.add(x=box[0], y=box[1], width=box[2], height=box[3])
        reply = stub(ch).Estimate(request, timeout=60)
        thread.join(60)
    assert rest_status == [200] and len(reply.persons) == 1
    assert sizes == [2]


def test_health_follows_the_worker_pool(tmp_path: Path) -> None:
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with tiny_services(tmp_path) as (pool, _app, _server, ch):
        health = health_pb2_grpc.HealthStub(ch)
        request = health_pb2.HealthCheckRequest(service="ditepose.v1.PoseService")
        assert health.Check(request).status == health_pb2.HealthCheckResponse.SERVING
        pool.stop()  # workers gone: the server must stop advertising itself
        deadline = time.monotonic() + 10
        while health.Check(request).status == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health still SERVING without workers"
            time.sleep(0.1)
        assert health.Check(request).status == health_pb2.HealthCheckResponse.NOT_SERVING
