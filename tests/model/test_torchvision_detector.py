"""torchvision detectors on the staged-detector contract, offline, with random weights.

Nothing is downloaded: each network is built with ``weights=None, weights_backbone=None``, saved as
a state dict and loaded through the public path (``weights_path=``, or torchvision's own weights
API reading the file from ``$TORCH_HOME`` where torch.hub would have put it). torchvision's random
initialisation makes MobileNetV3's activations vanish (all scores equal, whatever the image), so
the helper re-initialises the convolutions (He init) and raises the person logit: the outputs then
depend on the image and hold persons, which the batch and mapping checks need."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from ditepose.model.detectors import StagedDetector, build_detector, detect_staged, input_to_image
from ditepose.model.torchvision_detector import (
    FETCH_MODULE,
    TorchvisionDetector,
    cache_path,
    main,
    resolve_weights,
)
from ditepose.model.weight_store import WeightsMissing

SSD = "ssdlite320_mobilenet_v3_large"  # the smallest of the supported architectures
FRCNN_320 = "fasterrcnn_mobilenet_v3_large_320_fpn"


def _random_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """Random weights of ``arch`` whose outputs depend on the image and include persons (module doc)."""
    from torchvision.models import detection

    torch.manual_seed(0)
    model = getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=91)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu")
        if arch == SSD:
            for head in model.head.classification_head.module_list:
                head[-1].bias.view(-1, 91)[:, 1] += 2.0  # per anchor, the person logit
        else:  # Faster R-CNN: proposals = anchors, boxes = proposals, scores from the features
            for layer in (model.rpn.head.bbox_pred, model.roi_heads.box_predictor.bbox_pred):
                layer.weight.zero_()
                layer.bias.zero_()
            model.roi_heads.box_predictor.cls_score.weight.mul_(1e-3)
            model.roi_heads.box_predictor.cls_score.bias[1] += 5.0
    return model.state_dict()


@pytest.fixture(scope="module")
def ssd_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ssd") / "ssdlite.pth"
    torch.save({"state_dict": _random_state_dict(SSD)}, path)
    return path


@pytest.fixture(scope="module")
def ssd(ssd_file: Path) -> TorchvisionDetector:
    det = build_detector("torchvision", arch=SSD, weights_path=ssd_file, score_thr=0.0)
    assert isinstance(det, TorchvisionDetector)
    return det


@pytest.fixture(scope="module")
def two_photos(coco_mini: Path) -> list[np.ndarray]:
    """Two real photos of different sizes and shapes: a landscape one and the left half of another."""
    folder = coco_mini / "val2017"
    first, second = (cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(folder.glob("*.jpg"))[:2])
    second = np.ascontiguousarray(second[:, : second.shape[1] // 2])
    assert first.shape[:2] != second.shape[:2]
    return [first, second]


def test_bad_configuration_is_a_clear_error(tmp_path: Path, ssd_file: Path) -> None:
    missing = tmp_path / "nope" / "detector.pth"
    with pytest.raises(FileNotFoundError, match=r"nope/detector\.pth"):
        TorchvisionDetector(SSD, weights_path=missing)
    with pytest.raises(ValueError, match=r"weights='DEFAULT'.*weights_path"):
        build_detector("torchvision")
    with pytest.raises(ValueError, match="exactly one"):
        TorchvisionDetector(SSD, weights="DEFAULT", weights_path=ssd_file)
    with pytest.raises(ValueError, match="unknown torchvision detector arch 'yolo'"):
        TorchvisionDetector("yolo", weights="DEFAULT")
    with pytest.raises(ValueError, match=r"unknown weights 'COCO_V9'.*COCO_V1"):
        TorchvisionDetector(SSD, weights="COCO_V9")
    with pytest.raises(ValueError, match="are not weights of"):
        resolve_weights(SSD, resolve_weights(FRCNN_320, "DEFAULT"))
    with pytest.raises(ValueError, match=r"is not a state dict of torchvision fasterrcnn_mobilenet_v3_large_320_fpn"):
        TorchvisionDetector(FRCNN_320, weights_path=ssd_file)
    with pytest.raises(ValueError, match="input_hw"):
        TorchvisionDetector(SSD, weights_path=ssd_file, input_hw=(320,))
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("yolo")


def test_missing_weights_offline_name_the_file_and_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from torchvision.models.detection import SSDLite320_MobileNet_V3_Large_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.url.split("/")[-1]
    for name in ("DEFAULT", "COCO_V1", "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1",
                 SSDLite320_MobileNet_V3_Large_Weights.DEFAULT):
        assert cache_path(resolve_weights(SSD, name)) == expected
    with pytest.raises(WeightsMissing) as caught:
        build_detector("torchvision", arch=SSD, weights="DEFAULT", download=False)
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)  # what the service answers with 503 unavailable
    assert f"{expected} is missing" in message
    assert f"`{FETCH_MODULE} fetch {SSD}`" in message and "TORCH_HOME" in message and "weights_path" in message
    assert not expected.exists()
    assert main(["status"]) == 0
    assert f"{SSD}: missing  ({expected})" in capsys.readouterr().out


def test_torchvision_weights_api_reads_the_torch_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            ssd_file: Path, ssd: TorchvisionDetector) -> None:
    """The named-weights path with the file already cached: torchvision builds and loads it, no download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = cache_path(resolve_weights(SSD, "DEFAULT"))
    path.parent.mkdir(parents=True)
    torch.save(torch.load(ssd_file, weights_only=True)["state_dict"], path)
    det = TorchvisionDetector(SSD, weights="COCO_V1", download=False, score_thr=0.0)
    assert str(path) in det.source
    batch = ssd.preprocess(np.full((200, 300, 3), 90, np.uint8))
    torch.testing.assert_close(det.device_forward("cpu")(batch), ssd.device_forward("cpu")(batch))


def test_a_state_dict_without_batch_counts_loads(tmp_path: Path, ssd_file: Path, ssd: TorchvisionDetector) -> None:
    """torchvision's own .pth files come from FrozenBatchNorm models: no ``num_batches_tracked``."""
    state = torch.load(ssd_file, weights_only=True)["state_dict"]
    plain = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(plain) < len(state)
    torch.save(plain, tmp_path / "hub_style.pth")
    det = TorchvisionDetector(SSD, weights_path=tmp_path / "hub_style.pth", score_thr=0.0)
    batch = ssd.preprocess(np.full((100, 100, 3), 200, np.uint8))
    torch.testing.assert_close(det.device_forward("cpu")(batch), ssd.device_forward("cpu")(batch))


def test_staged_contract(ssd: TorchvisionDetector) -> None:
    assert isinstance(ssd, StagedDetector)
    assert ssd.input_hw == (320, 320) and ssd.name == f"torchvision:{SSD}@320x320"
    boxes, scores = ssd.detect(np.full((240, 320, 3), 128, np.uint8))
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert boxes.shape == (len(scores), 4) and (boxes[:, 2:] >= 1).all()


def test_preprocess_letterboxes_right_and_bottom(ssd: TorchvisionDetector) -> None:
    pad = torch.tensor(ssd.model.transform.image_mean).view(3, 1, 1)
    wide = np.zeros((240, 480, 3), np.uint8)
    wide[60:120, 100:200] = 255  # a white block, x 100..200, y 60..120
    x = ssd.preprocess(wide)
    assert x.shape == (1, 3, 320, 320) and x.dtype == torch.float32
    content_h = round(240 * 320 / 480)  # one factor, 2/3, for both axes
    torch.testing.assert_close(x[0, :, content_h:], pad.expand(3, 320 - content_h, 320))
    assert x[0, :, :content_h].max() == 1.0 and x[0, :, :content_h].min() == 0.0
    # the block in the input: INTER_AREA makes each pixel its covered fraction, so a profile's sum
    # is the block's extent and its first moment the block's centre, to sub-pixel precision
    def extent(profile: torch.Tensor) -> tuple[float, float]:
        size = float(profile.sum())
        centre = float(((torch.arange(len(profile)) + 0.5) * profile).sum()) / size
        return centre - size / 2, centre + size / 2

    x1, x2 = extent(x[0, 0, 60])  # input row 60: image row 90, through the block
    y1, y2 = extent(x[0, 0, :content_h, 100])  # input column 100: image column 150
    block = input_to_image(np.array([[x1, y1, x2, y2]]), (240, 480), ssd.input_hw, letterbox=True)
    np.testing.assert_allclose(block[0], [100, 60, 100, 60], atol=0.05)

    tall = ssd.preprocess(np.full((480, 120, 3), 255, np.uint8))  # factor 2/3: 80 columns of image
    torch.testing.assert_close(tall[0, :, :, 80:], pad.expand(3, 320, 240))
    assert (tall[0, :, :, :80] == 1.0).all()

    same = np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    torch.testing.assert_close(ssd.preprocess(same)[0], torch.from_numpy(same).permute(2, 0, 1).float() / 255)


def test_postprocess_maps_input_pixels_to_image_pixels(ssd_file: Path) -> None:
    det = TorchvisionDetector(SSD, weights_path=ssd_file, score_thr=0.5, nms_iou=0.6)
    cands = torch.zeros((det.candidates_per_image, 5))
    cands[:, 4] = -1.0
    cands[:4] = torch.tensor([
        [100.0, 20.0, 200.0, 100.0, 0.9],  # crosses the tall image's right edge (x 240 px = 120 input px)
        [32.0, 48.0, 96.0, 160.0, 0.8],
        [150.0, 10.0, 300.0, 90.0, 0.7],  # all in the tall image's padding
        [10.0, 10.0, 50.0, 50.0, 0.4],  # below score_thr
    ])
    # landscape 480x640: factor 0.5, nothing clipped
    boxes, scores = det.postprocess(cands, (480, 640))
    np.testing.assert_allclose(boxes, [[200, 40, 200, 160], [64, 96, 128, 224], [300, 20, 300, 160]])
    np.testing.assert_allclose(scores, [0.9, 0.8, 0.7], rtol=1e-6)
    # portrait 640x240: factor min(320/640, 320/240) = 0.5; clipped to the 240 px width
    boxes, scores = det.postprocess(cands, (640, 240))
    np.testing.assert_allclose(boxes, [[200, 40, 40, 160], [64, 96, 128, 224]])
    np.testing.assert_allclose(scores, [0.9, 0.8], rtol=1e-6)
    empty_boxes, empty_scores = det.postprocess(torch.full((det.candidates_per_image, 5), -1.0), (50, 50))
    assert empty_boxes.shape == (0, 4) and empty_scores.shape == (0,)


def test_device_forward_pads_person_candidates_to_k(ssd: TorchvisionDetector, two_photos: list[np.ndarray]) -> None:
    batch = torch.cat([ssd.preprocess(img) for img in two_photos])
    cands = ssd.device_forward("cpu")(batch)
    k = ssd.model.detections_per_img
    assert ssd.candidates_per_image == k and cands.shape == (2, k, 5) and cands.device.type == "cpu"
    for rows in cands:
        real = rows[:, 4] >= 0
        n = int(real.sum())
        assert 0 < n < k and real[:n].all(), "persons first, then padding"
        assert (rows[n:] == torch.tensor([0, 0, 0, 0, -1.0])).all()
        assert (rows[:n, 4] <= 1).all() and (rows[:n, 4].diff() <= 0).all(), "best first"
        assert (rows[:n, :4] >= 0).all() and (rows[:n, :4] <= 320).all()
        assert (rows[:n, 2:4] >= rows[:n, 0:2]).all()
    assert not torch.equal(cands[0], cands[1]), "the candidates depend on the image"
    # another device string gets its own copy of the network, with the same answers
    torch.testing.assert_close(ssd.device_forward("cpu:0")(batch), cands)
    assert ssd._on_device["cpu:0"] is not ssd.model


def test_one_batch_equals_one_image_at_a_time(ssd: TorchvisionDetector, two_photos: list[np.ndarray]) -> None:
    together = detect_staged(ssd, two_photos)
    for img, (boxes, scores) in zip(two_photos, together, strict=True):
        alone_boxes, alone_scores = ssd.detect(img)
        assert len(boxes) > 0 and boxes.shape == alone_boxes.shape
        np.testing.assert_allclose(boxes, alone_boxes, atol=0.05)
        np.testing.assert_allclose(scores, alone_scores, atol=1e-4)
        h, w = img.shape[:2]
        assert (boxes[:, 0] + boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 1] + boxes[:, 3] <= h + 1e-3).all()


def test_faster_rcnn_runs_at_its_input_size(tmp_path: Path, two_photos: list[np.ndarray]) -> None:
    """The R-CNN family: K from its ROI heads, and its internal resize set to a non-square input_hw."""
    path = tmp_path / "frcnn.pth"
    torch.save(_random_state_dict(FRCNN_320), path)
    det = build_detector("torchvision", arch=FRCNN_320, weights_path=path, input_hw=(256, 384), score_thr=0.0)
    assert isinstance(det, TorchvisionDetector) and det.candidates_per_image == det.model.roi_heads.detections_per_img
    assert det.model.transform.min_size == (256,) and det.model.transform.max_size == 384
    batch = torch.cat([det.preprocess(img) for img in two_photos])
    assert batch.shape == (2, 3, 256, 384)
    cands = det.device_forward("cpu")(batch)
    assert cands.shape == (2, det.candidates_per_image, 5)
    real = cands[..., 4] >= 0
    assert real.any(1).all()
    assert (cands[real][:, [0, 2]] <= 384).all() and (cands[real][:, [1, 3]] <= 256).all()
    for img, (boxes, _scores) in zip(two_photos, detect_staged(det, two_photos), strict=True):
        h, w = img.shape[:2]
        assert len(boxes) and (boxes[:, 0] + boxes[:, 2] <= w + 1e-3).all()
        assert (boxes[:, 1] + boxes[:, 3] <= h + 1e-3).all()
