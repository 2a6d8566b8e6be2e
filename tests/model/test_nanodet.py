"""The NanoDet port against the TF.js model it was ported from, and as the service's person detector."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ditepose.model.detectors import NanoDetDetector, build_detector
from ditepose.model.nanodet import NanoDet, build_nanodet, decode_boxes, normalize
from ditepose.model.weight_store import NANODET, WeightsMissing, locate

GOLDEN = Path(__file__).parent / "fixtures" / "nanodet_golden.npz"
OUTPUTS = ("cls8", "cls16", "cls32", "reg8", "reg16", "reg32")


@pytest.fixture(scope="module")
def nanodet() -> NanoDet:
    try:
        files = locate(NANODET)
    except WeightsMissing as exc:  # `make test` fetches them first; a bare pytest run says how
        pytest.fail(str(exc))
    return build_nanodet(files["nanodet.json"], files["nanodet.bin"])


def test_raw_outputs_match_the_tfjs_model(nanodet: NanoDet) -> None:
    """Golden: @tensorflow/tfjs 4.22 (pure-JS cpu backend) on 3 coco-mini images, the same float input."""
    golden = np.load(GOLDEN)
    worst = 0.0
    for i, image in enumerate(golden["input_u8_416_bgr"]):
        x = normalize(torch.from_numpy(image).permute(2, 0, 1)[None].float())
        assert hashlib.sha256(x.numpy().tobytes()).hexdigest() == str(golden["input_sha256"][i])
        with torch.no_grad():
            outputs = nanodet(x)
        for j, name in enumerate(OUTPUTS):
            ref = golden[f"img{i}_{name}"]
            mine = outputs[j][0, golden[f"img{i}_idx{j % 3}"]].numpy()
            assert mine.shape == ref.shape
            worst = max(worst, float(np.abs(mine - ref).max()))
    assert worst < 1e-3, worst


def test_a_batch_gives_the_outputs_of_single_images(nanodet: NanoDet) -> None:
    golden = np.load(GOLDEN)
    x = normalize(torch.from_numpy(golden["input_u8_416_bgr"][:2]).permute(0, 3, 1, 2).float())
    with torch.no_grad():
        batch = nanodet(x)
        single = nanodet(x[1:2])
    for b, s in zip(batch, single, strict=True):
        torch.testing.assert_close(b[1:2], s, atol=1e-5, rtol=1e-5)


def test_decode_puts_boxes_around_anchor_centres() -> None:
    """Zero distance logits -> each side's expectation is 5 bins x stride around the anchor centre."""
    raw = tuple(torch.zeros(1, n, 80) for n in (2704, 676, 169)) + tuple(torch.zeros(1, n, 44) for n in (2704, 676, 169))
    boxes, scores = decode_boxes(raw)
    assert boxes.shape == (1, 3549, 4) and scores.shape == (1, 3549, 80)
    # first stride-8 anchor: centre (4, 4), distances 5 * 8 = 40 -> clipped at 0
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.0, 0.0, 44.0, 44.0]))
    # stride-32 anchor (row 6, col 6) of 13x13: centre (208, 208), distance 160
    torch.testing.assert_close(boxes[0, 2704 + 676 + 6 * 13 + 6], torch.tensor([48.0, 48.0, 368.0, 368.0]))


def test_detector_finds_the_people_of_a_real_photo(coco_mini: Path) -> None:
    """000000217285.jpg: the three people the service tests box by hand are all found, each once."""
    from tests.service.conftest import COCO_BOXES, COCO_IMAGE

    image = cv2.cvtColor(cv2.imread(str(coco_mini / "val2017" / COCO_IMAGE)), cv2.COLOR_BGR2RGB)
    detector = build_detector("nanodet")
    assert isinstance(detector, NanoDetDetector)
    boxes, scores = detector.detect(image)
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4 and len(scores) == len(boxes)
    assert np.all(np.diff(scores) <= 0) and scores.min() > 0.3
    for gt in COCO_BOXES:
        ious = [_iou(gt, b) for b in boxes]
        assert max(ious) > 0.5, (gt, boxes[:5])
    batch = detector.detect_batch([image, image[:, ::-1].copy()])
    np.testing.assert_allclose(batch[0][0], boxes, atol=1e-3)
    assert len(batch[1][0]) > 0


def test_missing_weights_name_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissing, match="ditepose weights fetch"):
        build_detector("nanodet", weights_dir=tmp_path)


def _iou(a, b) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    h = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)
