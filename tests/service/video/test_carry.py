"""Boxes carried from one video frame to the next (:mod:`ditepose.service.video.carry`): pure rules,
no server (the streams that use them are tested in tests/service/grpc/test_stream_detection.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ditepose.service.video.carry import CarryConfig, box_from_keypoints, carried_boxes


def _person(x0: float, y0: float, score: float = 0.9) -> np.ndarray:
    """17 keypoints spread over a 40 x 100 px figure whose top-left keypoint is (x0, y0)."""
    xs = x0 + np.tile([0.0, 20.0, 40.0], 6)[:17]
    ys = y0 + np.repeat(np.linspace(0.0, 100.0, 6), 3)[:17]
    return np.stack([xs, ys, np.full(17, score)], axis=1)


def test_box_from_keypoints_is_their_box_enlarged_about_its_centre() -> None:
    kpts = _person(100, 50)
    kpts[0] = (0.0, 0.0, 0.1)  # a misplaced low-score joint is left out
    box = box_from_keypoints(kpts)
    assert box is not None
    np.testing.assert_allclose(box, [120 - 25, 100 - 62.5, 50, 125])  # 40 x 100 around (120, 100), x1.25


def test_a_moving_person_is_followed_and_weak_or_wild_keypoints_keep_the_old_box() -> None:
    previous = [np.array([95.0, 37.5, 50.0, 125.0])] * 4
    moved = _person(110, 50)  # 10 px to the right of the box's figure
    weak = _person(110, 50, score=0.2)  # nothing above score_thr
    wild = _person(110, 50)
    wild[:, :2] = wild[:, :2] * 0.1 + 300  # confident but far away: IoU with the old box ~0
    two = _person(110, 50)
    two[2:, 2] = 0.0  # two confident joints < min_keypoints
    out = carried_boxes([moved, weak, wild, two], previous, 640, 480)
    np.testing.assert_allclose(out[0], [105, 37.5, 50, 125])
    for row in out[1:]:
        np.testing.assert_allclose(row, previous[0])
    # min_iou=0 believes any keypoint box (rtmlib's rule)
    assert carried_boxes([wild], previous[:1], 640, 480, CarryConfig(min_iou=0.0))[0, 0] > 290


def test_carried_boxes_are_clipped_to_the_image_and_dropped_outside_it() -> None:
    near_edge = _person(600, 400)
    out = carried_boxes([near_edge], [np.array([590.0, 380.0, 60.0, 130.0])], 640, 480)
    x, y, w, h = out[0]
    assert x >= 0 and y >= 0 and x + w == 640 and y + h == 480
    gone = _person(700, 500, score=0.0)  # no keypoints to go by, and the old box is off the image
    assert carried_boxes([gone], [np.array([700.0, 500.0, 40.0, 90.0])], 640, 480).shape == (0, 4)
    with pytest.raises(ValueError, match="2 keypoint sets for 1 boxes"):
        carried_boxes([near_edge, gone], [np.zeros(4)], 640, 480)
    with pytest.raises(ValueError, match="min_iou"):
        CarryConfig(min_iou=1.5)
