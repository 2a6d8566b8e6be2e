"""Requests without boxes: the service finds the people itself (NanoDet), or says what it needs."""

from __future__ import annotations

from pathlib import Path

import grpc

from ditepose.proto.ditepose.v1 import pose_pb2, pose_pb2_grpc
from ditepose.service.core.settings import ModelSpec, Settings
from ditepose.service.grpc.server import start_grpc_server
from ditepose.service.http.deps import context_of
from tests.service.conftest import COCO_BOXES, assert_error, post_pose, start_server


def _covered(boxes: list[list[float]], truth: list[list[float]]) -> int:
    """How many ``truth`` boxes some returned box overlaps by IoU > 0.5."""
    def iou(a: list[float], b: list[float]) -> float:
        w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)

    return sum(any(iou(t, b) > 0.5 for b in boxes) for t in truth)


def test_a_photo_without_boxes_gives_one_pose_per_person(hrnet18_checkpoint: Path, coco_jpeg: bytes) -> None:
    with start_server(models=[ModelSpec(name="hrnet18", checkpoint=hrnet18_checkpoint)]) as live, \
            live.client() as client:
        models = client.get("/v1/models").json()
        assert models["default_detector"] == "nanodet" and models["detectors"] == {"nanodet": "ready"}
        assert client.get("/readyz").json()["detectors"] == {"nanodet": "ready"}
        body = post_pose(client, coco_jpeg).json()
        boxes = [p["bbox"] for p in body["persons"]]
        assert len(boxes) >= len(COCO_BOXES) and _covered(boxes, COCO_BOXES) == len(COCO_BOXES)
        assert all(len(p["keypoints"]) == 17 for p in body["persons"])
        # the whole-image box is still there when asked for
        assert len(post_pose(client, coco_jpeg, detector="whole").json()["persons"]) == 1
        # gRPC, same service: no boxes -> the same persons
        settings = context_of(live.app).settings.model_copy(update={"grpc_port": 0})
        service = context_of(live.app).service
        assert service is not None
        server = start_grpc_server(settings, service)
        try:
            with grpc.insecure_channel(server.address) as channel:
                reply = pose_pb2_grpc.PoseServiceStub(channel).Estimate(
                    pose_pb2.EstimateRequest(image=coco_jpeg), timeout=60)
        finally:
            server.stop()
        assert [round(p.bbox.x, 1) for p in reply.persons] == [round(b[0], 1) for b in boxes]


def test_missing_detector_weights_give_503_naming_the_fix(hrnet18_checkpoint: Path, coco_jpeg: bytes,
                                                          tmp_path: Path) -> None:
    models = [ModelSpec(name="hrnet18", checkpoint=hrnet18_checkpoint)]
    with start_server(models=models, weights_dir=tmp_path) as live, live.client() as client:
        listing = client.get("/v1/models").json()
        assert listing["default_detector"] == "whole"  # 'auto' without the weights
        assert "ditepose weights fetch" in listing["detectors"]["nanodet"]
        ready = client.get("/readyz")
        assert ready.status_code == 200 and "ditepose weights fetch" in ready.json()["detectors"]["nanodet"]
        body = assert_error(post_pose(client, coco_jpeg, detector="nanodet"), 503, "unavailable")
        assert "ditepose weights fetch" in body["error"]["message"]
        assert len(post_pose(client, coco_jpeg).json()["persons"]) == 1  # the default still answers
        assert_error(post_pose(client, coco_jpeg, detector="yolo"), 422, "invalid_request")


def test_detector_setting_is_checked() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown detector"):
        Settings(_env_file=None, detector="yolo")


def test_one_detection_batch_serves_two_requests(hrnet18_checkpoint: Path, coco_jpeg: bytes) -> None:
    """Detection runs on the worker pool with its own queue: two requests without boxes that
    arrive together go through the detector in one forward pass, and each gets its own persons."""
    import concurrent.futures

    import cv2
    import numpy as np

    from ditepose.model.detectors import build_detector

    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(coco_jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    mirrored = cv2.imencode(".png", cv2.cvtColor(rgb[:, ::-1], cv2.COLOR_RGB2BGR))[1].tobytes()
    alone = build_detector("nanodet").detect_batch([rgb, np.ascontiguousarray(rgb[:, ::-1])])
    # a long quiet window, so the worker waits for the second image instead of running the first alone
    with start_server(models=[ModelSpec(name="hrnet18", checkpoint=hrnet18_checkpoint)],
                      max_delay_ms=1000.0) as live, live.client() as client:
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            replies = list(ex.map(lambda img: post_pose(client, img), [coco_jpeg, mirrored]))
        metrics = client.get("/metrics").text
    assert [r.status_code for r in replies] == [200, 200]
    for reply, (boxes, _) in zip(replies, alone, strict=True):
        body = reply.json()
        got = [p["bbox"] for p in body["persons"]]
        assert len(got) == len(boxes)
        np.testing.assert_allclose(sorted(b[0] for b in got), sorted(boxes[:, 0]), atol=0.05)
        assert body["timings"]["detect_ms"] > 0
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
               if line.startswith("ditepose_detection_batch_size_")}
    assert samples['ditepose_detection_batch_size_count{detector="nanodet",device="cpu"}'] == 1.0
    assert samples['ditepose_detection_batch_size_sum{detector="nanodet",device="cpu"}'] == 2.0
    assert 'ditepose_detection_queue_depth{detector="nanodet"} 0.0' in metrics
    assert 'ditepose_queue_depth{model="detect:nanodet"}' not in metrics


def test_caller_boxes_skip_detection(hrnet18_checkpoint: Path, coco_jpeg: bytes) -> None:
    with start_server(models=[ModelSpec(name="hrnet18", checkpoint=hrnet18_checkpoint)]) as live, \
            live.client() as client:
        body = post_pose(client, coco_jpeg, boxes=[COCO_BOXES[0]]).json()
        metrics = client.get("/metrics").text
    assert len(body["persons"]) == 1 and body["timings"]["detect_ms"] == 0.0
    assert "ditepose_detection_batch_size_count" not in metrics


def test_torchvision_detector_runs_on_the_pool_from_a_local_state_dict(
        hrnet18_checkpoint: Path, coco_jpeg: bytes, tmp_path: Path, monkeypatch) -> None:
    """detector=torchvision: the configured arch and weights file, batched on the pool like NanoDet;
    without its weights (an empty TORCH_HOME, never a download) a 503 naming the fetch command."""
    import torch

    from tests.model.test_torchvision_detector import SSD, _random_state_dict

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    models = [ModelSpec(name="hrnet18", checkpoint=hrnet18_checkpoint)]
    with start_server(models=models, torchvision_arch=SSD) as live, live.client() as client:
        body = assert_error(post_pose(client, coco_jpeg, detector="torchvision"), 503, "unavailable")
        assert "fetch" in body["error"]["message"] and SSD in body["error"]["message"]
        assert not (tmp_path / "torch-home").exists() or not any((tmp_path / "torch-home").rglob("*.pth"))
    weights = tmp_path / "ssdlite.pth"
    torch.save(_random_state_dict(SSD), weights)
    with start_server(models=models, torchvision_arch=SSD, torchvision_weights=str(weights)) as live, \
            live.client() as client:
        reply = post_pose(client, coco_jpeg, detector="torchvision")
        metrics = client.get("/metrics").text
    assert reply.status_code == 200, reply.text
    assert reply.json()["timings"]["detect_ms"] > 0
    label = f'detector="torchvision:{SSD}@320x320",device="cpu"'
    assert f"ditepose_detection_batch_size_count{{{label}}} 1.0" in metrics
