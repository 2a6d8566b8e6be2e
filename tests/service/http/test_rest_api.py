"""The REST API end to end: real uvicorn, real pool, real Dite-HRNet weights from the fixtures."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from ditepose import model
from ditepose.model.engines.torch_engine import InferenceEngine
from ditepose.model.pipeline import PoseEstimator, TopDownPipeline
from ditepose.model.transforms import PIXEL_STD, box_to_center_scale
from ditepose.service.core.images import decode_image
from tests.service.conftest import COCO_BOXES, encode, figure_image, post_pose


def _keypoint_array(person: dict) -> np.ndarray:
    return np.array([[k["x"], k["y"], k["score"]] for k in person["keypoints"]], np.float64)


def test_multipart_jpeg_gives_17_keypoints_in_image_coordinates(server, coco_jpeg):
    with server.client() as client:
        response = post_pose(client, coco_jpeg, boxes=COCO_BOXES, model="hrnet18")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "hrnet18"
    assert body["image"] == {"width": 640, "height": 427}
    assert set(body["timings"]) == {"decode_ms", "detect_ms", "preprocess_ms", "inference_ms", "postprocess_ms", "total_ms"}
    assert body["timings"]["detect_ms"] == 0.0  # the caller gave boxes
    assert body["timings"]["total_ms"] >= body["timings"]["inference_ms"] > 0
    assert len(body["persons"]) == len(COCO_BOXES)
    for person, box in zip(body["persons"], COCO_BOXES, strict=True):
        assert person["bbox"] == pytest.approx(box, abs=0.01)
        names = [k["name"] for k in person["keypoints"]]
        assert names == list(model.COCO.joint_names)
        kpts = _keypoint_array(person)
        # Keypoints come back in image pixels, inside the crop region (aspect-fixed, 1.25-padded box).
        center, scale = box_to_center_scale(np.array(box), 192 / 256, 1.25)
        half = scale * PIXEL_STD / 2
        margin = half / 12  # two heatmap pixels: an all-negative map decodes to -1 (mmpose)
        assert (kpts[:, :2] >= center - half - margin).all() and (kpts[:, :2] <= center + half + margin).all()
        assert np.ptp(kpts[:, 0]) > 0 or np.ptp(kpts[:, 1]) > 0


def test_results_equal_pose_estimator_predict(server, coco_image_path, hrnet18_checkpoint):
    """The service's batched path gives what the library's PoseEstimator gives on the same input."""
    png = encode(np.asarray(Image.open(coco_image_path).convert("RGB")), ".png")
    image = decode_image(png, 10**8, 10**8)
    module, meta = model.load_pose_model(hrnet18_checkpoint)
    for flip, decoder in ((True, "default"), (False, "dark")):
        # the service serves through the optimised engine: compare like with like (decoding random-weight
        # heatmaps, e.g. DARK, magnifies the ~1e-4 fp32 difference between the eager and the fused network)
        estimator = PoseEstimator(InferenceEngine(module), TopDownPipeline(meta.input_size, model.COCO, flip, decoder))
        expected = estimator.predict(image, np.array(COCO_BOXES, np.float32))
        with server.client() as client:
            response = post_pose(client, png, boxes=COCO_BOXES, model="hrnet18", flip_test=flip, decoder=decoder)
        assert response.status_code == 200, response.text
        persons = response.json()["persons"]
        assert len(persons) == len(expected)
        for got, want in zip(persons, expected, strict=True):
            np.testing.assert_allclose(_keypoint_array(got)[:, :2], want.keypoints[:, :2], atol=0.1, rtol=1e-4)  # fp32 batch-composition noise (rtol: DARK can blow up a degenerate map)
            np.testing.assert_allclose(_keypoint_array(got)[:, 2], want.keypoints[:, 2], rtol=1e-3, atol=1e-6)
            assert got["score"] == pytest.approx(want.score, rel=1e-3, abs=1e-6)


def test_json_base64_body_equals_multipart(server):
    jpeg = encode(figure_image(seed=3))
    boxes = [[200.0, 40.0, 240.0, 400.0]]
    with server.client() as client:
        multipart = post_pose(client, jpeg, boxes=boxes, model="hrnet18").json()
        as_json = client.post(
            "/v1/pose", json={"image": base64.b64encode(jpeg).decode(), "boxes": boxes, "model": "hrnet18"}
        ).json()
    assert as_json["persons"] == multipart["persons"]


def test_without_boxes_the_named_detector_finds_the_persons(server):
    jpeg = encode(figure_image(seed=4))
    with server.client() as client:
        whole = post_pose(client, jpeg, model="hrnet18", flip_test=False, detector="whole").json()
        hog = post_pose(client, jpeg, model="hrnet18", detector="hog")
        nanodet = post_pose(client, jpeg, model="hrnet18", detector="nanodet")
    assert whole["persons"][0]["bbox"] == [0.0, 0.0, 640.0, 480.0]
    assert hog.status_code == 200 and isinstance(hog.json()["persons"], list)
    # a drawn stick figure is no photo: NanoDet may or may not see a person, but never the whole frame
    assert nanodet.status_code == 200
    assert all(p["bbox"] != [0.0, 0.0, 640.0, 480.0] for p in nanodet.json()["persons"])


def test_second_model_is_chosen_per_request(server):
    jpeg = encode(figure_image(seed=5))
    with server.client() as client:
        body = post_pose(client, jpeg, boxes=[[200, 40, 240, 400]], model="hrnet30_mpii", flip_test=False).json()
        models = client.get("/v1/models").json()["models"]
    assert body["model"] == "hrnet30_mpii"
    assert [k["name"] for k in body["persons"][0]["keypoints"]] == list(model.MPII.joint_names)
    by_name = {m["name"]: m for m in models}
    assert by_name["hrnet18"]["default"] and not by_name["hrnet30_mpii"]["default"]
    assert by_name["hrnet30_mpii"]["num_joints"] == 16 and by_name["hrnet30_mpii"]["input_size"] == [256, 256]
    assert by_name["hrnet18"]["arch"] == "dite_hrnet_18" and by_name["hrnet18"]["demo_weights"] is False


def test_score_threshold_drops_persons(server):
    jpeg = encode(figure_image(seed=6))
    boxes = [[200, 40, 240, 400], [10, 10, 100, 100]]
    with server.client() as client:
        scores = [p["score"] for p in post_pose(client, jpeg, boxes=boxes, model="hrnet18").json()["persons"]]
        assert scores[0] != scores[1]
        cut = (scores[0] + scores[1]) / 2
        kept = post_pose(client, jpeg, boxes=boxes, model="hrnet18", score_threshold=cut).json()["persons"]
    assert [p["score"] for p in kept] == [max(scores)]


def test_render_png_returns_the_annotated_image(server):
    img = figure_image(seed=7)
    with server.client() as client:
        response = post_pose(client, encode(img, ".png"), params={"render": "png"}, boxes=[[200, 40, 240, 400]])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    assert drawn.shape == img.shape
    assert (drawn != img).any()  # boxes / limbs were drawn


def test_health_ready_models_and_openapi(server):
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        schema = client.get("/openapi.json").json()
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True
    assert body["models"] == {"hrnet18": "loaded", "hrnet30_mpii": "loaded"}
    assert body["workers"] and all(w["alive"] for w in body["workers"])
    for path in ("/v1/pose", "/v1/models", "/healthz", "/readyz", "/metrics"):
        assert path in schema["paths"], path
    content = schema["paths"]["/v1/pose"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert "image" in content["application/json"]["schema"]["properties"]
    assert "PoseResponse" in schema["components"]["schemas"]
    assert "X-API-Key" in json.dumps(schema["components"].get("securitySchemes", {}))


def test_metrics_expose_requests_queue_workers_and_models(server, coco_jpeg):
    with server.client() as client:
        post_pose(client, coco_jpeg, boxes=COCO_BOXES[:1], model="hrnet18")
        text = client.get("/metrics").text
    assert 'ditepose_http_requests_total{method="POST",route="/v1/pose",status="200"}' in text
    assert "ditepose_http_request_duration_seconds_bucket" in text
    assert 'ditepose_queue_depth{model="hrnet18"}' in text
    assert 'ditepose_worker_state{device="cpu",state="idle",worker="cpu/0"}' in text
    assert 'ditepose_model_info{arch="dite_hrnet_18",dataset="coco",demo_weights="false",model="hrnet18"} 1.0' in text
    assert "ditepose_inference_duration_seconds_count" in text
    assert "ditepose_batch_size_bucket" in text
