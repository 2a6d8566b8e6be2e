"""Person detectors: whole image, OpenCV HOG on a real photo (torchvision: test_torchvision_detector.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ditepose.model.detectors import (
    HogPersonDetector,
    PersonDetector,
    WholeImageDetector,
    box_nms,
    build_detector,
)


def _val_image(coco_mini: Path, name: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(coco_mini / "val2017" / name)), cv2.COLOR_BGR2RGB)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_whole_image_detector() -> None:
    det = build_detector("whole")
    assert isinstance(det, PersonDetector) and isinstance(det, WholeImageDetector)
    boxes, scores = det.detect(np.zeros((480, 640, 3), np.uint8))
    np.testing.assert_array_equal(boxes, [[0, 0, 640, 480]])
    np.testing.assert_array_equal(scores, [1.0])


def test_box_nms_keeps_best_of_overlapping() -> None:
    boxes = np.array([[0, 0, 100, 200], [5, 5, 100, 200], [300, 0, 100, 200]], np.float32)
    keep = box_nms(boxes, np.array([0.5, 0.9, 0.7]), iou_thr=0.5)
    np.testing.assert_array_equal(keep, [1, 2])


@pytest.mark.skipif(not hasattr(cv2, "HOGDescriptor"), reason="this OpenCV build has no HOGDescriptor")
def test_hog_detector_runs_on_a_real_photo(coco_mini: Path) -> None:
    # one standing person, annotated at (388, 69, 109, 277) in the COCO json
    img = _val_image(coco_mini, "000000397133.jpg")
    det = build_detector("hog")
    assert isinstance(det, HogPersonDetector)
    boxes, scores = det.detect(img)
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(scores) == len(boxes)
    h, w = img.shape[:2]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= w + 1e-3).all()
    assert (boxes[:, 1] + boxes[:, 3] <= h + 1e-3).all()
    assert max(_iou(b, np.array([388, 69, 109, 277])) for b in boxes) > 0.3
    assert (np.diff(scores) <= 0).all(), "best score first"
    # a tiny image cannot hold the 64x128 window: no boxes, no error
    small_boxes, _ = det.detect(np.zeros((60, 40, 3), np.uint8))
    assert small_boxes.shape == (0, 4)
