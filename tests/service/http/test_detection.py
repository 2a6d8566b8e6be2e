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
        server = start_grpc_server(settings, live.pool, context_of(live.app).service)
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
