"""StreamConfig.detect_interval: the person detector on every N-th frame, boxes carried between.

The stream tests run a real gRPC server with the real NanoDet detector (the server's default)
and the shipped demo checkpoint on a real coco-mini photo with several people, sent as the
frames of a still video. NanoDet's score threshold is raised to 0.6 so the photo gives its 3
annotated people and one more (not two dozen doubtful boxes), which keeps each frame cheap.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from ditepose.model.defaults import default_checkpoint_path
from ditepose.proto.ditepose.v1 import pose_pb2
from ditepose.service.cli import register_stream
from ditepose.service.cli.stream_client import result_record, stream_config
from ditepose.service.grpc.convert import ERROR_CODE_METADATA
from ditepose.service.grpc.stream import DEFAULT_DETECT_INTERVAL, MAX_DETECT_INTERVAL
from ditepose.service.video.tracking import iou_matrix
from tests.service.conftest import COCO_BOXES
from tests.service.grpc.support import channel, jpeg, make_settings, running_services, stub

D, C, U = pose_pb2.BOX_SOURCE_DETECTED, pose_pb2.BOX_SOURCE_CARRIED, pose_pb2.BOX_SOURCE_CLIENT


# ----------------------------------------------------------------- streams (real server)
def _settings(tmp_path: Path):
    checkpoint = default_checkpoint_path()
    if checkpoint is None:
        pytest.skip("model/weights/dite_hrnet_18_coco_demo.pth is not in this checkout")
    return make_settings(checkpoint, name="demo", det_score_threshold=0.6)


class DetectionCount:
    """Pool observer: images the workers ran through a person detector (the server's own count)."""

    def __init__(self) -> None:
        self.images = 0
        self._lock = threading.Lock()

    def observe_batch(self, *args, **kwargs) -> None:
        pass

    def observe_detection(self, detector, device, size, infer_s, queued_s, ok) -> None:
        with self._lock:
            self.images += size


def _frames(images: list[bytes], boxes: dict[int, list[list[float]]] | None = None) -> list[pose_pb2.StreamRequest]:
    out = []
    for i, data in enumerate(images):
        frame = pose_pb2.Frame(sequence_number=i, timestamp=i / 30.0, image=data)
        for b in (boxes or {}).get(i, []):
            frame.boxes.add(x=b[0], y=b[1], width=b[2], height=b[3])
        out.append(pose_pb2.StreamRequest(frame=frame))
    return out


def _stream(ch: grpc.Channel, frames: list, **config) -> list[pose_pb2.StreamResult]:
    config.setdefault("options", pose_pb2.PoseOptions(flip_test=False))
    config.setdefault("tracking", pose_pb2.TrackingConfig(enabled=True))
    head = pose_pb2.StreamRequest(config=pose_pb2.StreamConfig(**config))
    results = list(stub(ch).StreamPose(iter([head, *frames]), timeout=300))
    assert [r.sequence_number for r in results] == [f.frame.sequence_number for f in frames]
    assert not any(r.HasField("error") for r in results), [r.error for r in results]
    return results


def _boxes(result: pose_pb2.StreamResult) -> dict[int, np.ndarray]:
    return {p.track_id: np.array([p.bbox.x, p.bbox.y, p.bbox.width, p.bbox.height]) for p in result.persons}


def _check_carried_follow_detected(results: list[pose_pb2.StreamResult]) -> None:
    """Same people in every frame, same ids, each carried box near that person's detected box."""
    first = _boxes(results[0])
    assert len(first) == 4 and sorted(first) == [1, 2, 3, 4]
    truth = np.array(COCO_BOXES)
    assert (iou_matrix(truth, np.stack(list(first.values()))).max(axis=1) > 0.5).all()  # the 3 annotated people
    last_detected = first
    for r in results:
        boxes = _boxes(r)
        assert sorted(boxes) == sorted(first), [p.track_id for p in r.persons]
        if r.box_source == D:
            last_detected = boxes
        for track_id, box in boxes.items():
            assert iou_matrix(box[None], last_detected[track_id][None])[0, 0] > 0.5, (r.sequence_number, track_id)


def test_detector_runs_on_every_nth_frame_only(tmp_path: Path, coco_jpeg: bytes) -> None:
    """detect_interval=3 over 7 frames: detection on frames 0, 3, 6, whether the frames go one at a
    time or 4 in flight; the default (0 -> 5) detects on 0 and 5; 1 detects on every frame. The
    frames' own report (box_source, timings.detect_ms) and the workers' count agree."""
    seven = _frames([coco_jpeg] * 7)
    counted = DetectionCount()
    with running_services(_settings(tmp_path)) as (pool, _app, server), channel(server) as ch:
        pool.add_observer(counted)
        runs = {
            "every 3rd, 1 in flight": _stream(ch, seven, detect_interval=3, max_in_flight=1),
            "every 3rd, 4 in flight": _stream(ch, seven, detect_interval=3, max_in_flight=4),
            "default": _stream(ch, seven[:6]),
            "every frame": _stream(ch, seven[:3], detect_interval=1, max_in_flight=2),
        }
    # the pool has stopped: every worker has reported every batch it ran
    expected = {
        "every 3rd, 1 in flight": [D, C, C, D, C, C, D],
        "every 3rd, 4 in flight": [D, C, C, D, C, C, D],
        "default": [D if i % DEFAULT_DETECT_INTERVAL == 0 else C for i in range(6)],
        "every frame": [D, D, D],
    }
    assert expected["default"] == [D, C, C, C, C, D]
    for name, results in runs.items():
        assert [r.box_source for r in results] == expected[name], name
        for r in results:
            assert (r.timings.detect_ms > 0) == (r.box_source == D), (name, r.sequence_number, r.timings)
        _check_carried_follow_detected(results)
    assert counted.images == sum(s == D for sources in expected.values() for s in sources) == 3 + 3 + 2 + 3


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    with running_services(_settings(tmp_path_factory.mktemp("det"))) as (_pool, _app, server), \
            channel(server) as ch:
        yield ch


def test_nobody_in_the_picture_means_detecting_on_every_frame(services: grpc.Channel) -> None:
    blank = jpeg(np.full((427, 640, 3), 128, np.uint8))
    results = _stream(services, _frames([blank] * 4), detect_interval=3, max_in_flight=1)
    assert [r.box_source for r in results] == [D, D, D, D]
    assert all(not r.persons and r.timings.detect_ms > 0 for r in results)


def test_frames_with_boxes_use_them_and_later_frames_carry_them(services: grpc.Channel, coco_jpeg: bytes) -> None:
    given = {0: COCO_BOXES, 4: COCO_BOXES[:1]}
    results = _stream(services, _frames([coco_jpeg] * 6, given), detect_interval=3, max_in_flight=2)
    assert [r.box_source for r in results] == [U, C, C, D, U, C]
    assert [len(r.persons) for r in results] == [3, 3, 3, 4, 1, 1]
    for r in (results[1], results[2]):  # carried from the caller's boxes of frame 0
        boxes = np.stack(list(_boxes(r).values()))
        assert (iou_matrix(np.array(COCO_BOXES), boxes).max(axis=1) > 0.5).all()
        assert r.timings.detect_ms == 0.0


def test_carried_boxes_a_smaller_frame_cannot_take_make_it_detect(services: grpc.Channel, coco_image_path: Path) -> None:
    """Boxes from a 640x427 frame lie outside a 200x150 frame (bad_boxes): that frame detects instead."""
    image = cv2.cvtColor(cv2.imread(str(coco_image_path)), cv2.COLOR_BGR2RGB)
    small = jpeg(np.ascontiguousarray(image[:150, :200]))
    results = _stream(services, _frames([jpeg(image), small]), detect_interval=3, max_in_flight=1)
    assert [r.box_source for r in results] == [D, D]
    assert (results[1].width, results[1].height) == (200, 150)


def test_too_large_detect_interval_is_invalid_argument(services: grpc.Channel, coco_jpeg: bytes) -> None:
    frames = _frames([coco_jpeg])
    head = pose_pb2.StreamRequest(config=pose_pb2.StreamConfig(detect_interval=MAX_DETECT_INTERVAL + 1))
    with pytest.raises(grpc.RpcError) as info:
        list(stub(services).StreamPose(iter([head, *frames]), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata() or ()).get(ERROR_CODE_METADATA) == "invalid_request"
    assert "detect_interval must be <= 300" in info.value.details()
    assert str(MAX_DETECT_INTERVAL + 1) in info.value.details()
    # the largest allowed value opens a stream (no frames: no results, no error)
    head = pose_pb2.StreamRequest(config=pose_pb2.StreamConfig(detect_interval=MAX_DETECT_INTERVAL))
    assert list(stub(services).StreamPose(iter([head]), timeout=60)) == []


# ----------------------------------------------------------------- the stream client
def test_stream_client_passes_detect_interval_and_reports_the_box_source() -> None:
    parser = argparse.ArgumentParser()
    register_stream(parser.add_subparsers())
    args = parser.parse_args(["stream", "walk.mp4", "--detect-interval", "10"])
    assert args.detect_interval == 10
    assert parser.parse_args(["stream", "walk.mp4"]).detect_interval == 0  # the server decides
    with pytest.raises(SystemExit):
        parser.parse_args(["stream", "walk.mp4", "--detect-interval", "-1"])
    assert stream_config(detect_interval=10).detect_interval == 10
    with pytest.raises(ValueError, match="detect_interval"):
        stream_config(detect_interval=-2)
    result = pose_pb2.StreamResult(sequence_number=3, box_source=C)
    assert result_record(result)["boxes"] == "carried"
    assert "boxes" not in result_record(pose_pb2.StreamResult(sequence_number=4))  # an older server
