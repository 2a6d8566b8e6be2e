"""Pose drawing: the right limbs in the right colours, hidden low-score joints."""

from __future__ import annotations

import numpy as np
import pytest

from ditepose.model.draw import PALETTE, draw_poses, limb_color, plan_drawing
from ditepose.model.keypoints import COCO
from ditepose.model.pipeline import PersonPose


def _person(score_low: tuple[int, ...] = ()) -> PersonPose:
    """A stick figure on a 400x400 canvas, far apart joints so edge midpoints don't overlap."""
    xy = {
        0: (200, 40), 1: (190, 30), 2: (210, 30), 3: (175, 35), 4: (225, 35),
        5: (150, 100), 6: (250, 100), 7: (100, 160), 8: (300, 160), 9: (60, 220), 10: (340, 220),
        11: (170, 230), 12: (230, 230), 13: (160, 300), 14: (240, 300), 15: (150, 380), 16: (250, 380),
    }
    kpts = np.array([[*xy[j], 0.9] for j in range(17)], np.float32)
    kpts[list(score_low), 2] = 0.1
    return PersonPose(np.array([40, 20, 320, 370], np.float32), 0.9, kpts)


def test_limb_colours_by_side_and_part() -> None:
    assert limb_color(COCO, 7, 9) == PALETTE[("left", "arm")]
    assert limb_color(COCO, 8, 10) == PALETTE[("right", "arm")]
    assert limb_color(COCO, 15, 13) == PALETTE[("left", "leg")]
    assert limb_color(COCO, 11, 12) == PALETTE[("center", "torso")]
    assert limb_color(COCO, 0, 1) == PALETTE[("center", "head")]


def test_plan_lists_every_skeleton_edge() -> None:
    plan = plan_drawing([_person()], COCO)
    assert {e.joints for e in plan.edges} == set(COCO.skeleton)
    assert len(plan.joints) == 17 and plan.boxes == [(40, 20, 360, 390)]


def test_low_score_joints_and_their_edges_are_hidden() -> None:
    plan = plan_drawing([_person(score_low=(9, 15))], COCO, score_thr=0.3)
    shown = {j.joint for j in plan.joints}
    assert 9 not in shown and 15 not in shown and len(shown) == 15
    for edge in plan.edges:
        assert 9 not in edge.joints and 15 not in edge.joints
    assert (7, 9) not in {e.joints for e in plan.edges}


def test_pixels_along_edges_have_the_limb_colour() -> None:
    canvas = np.zeros((400, 400, 3), np.uint8)
    person = _person(score_low=(10,))
    out = draw_poses(canvas, [person], COCO, score_thr=0.3)
    assert out.shape == canvas.shape and not canvas.any(), "input must not be modified"
    kpts = person.keypoints
    for a, b in [(7, 9), (13, 15), (14, 16), (5, 7), (11, 12)]:
        mid = np.round((kpts[a, :2] + kpts[b, :2]) / 2).astype(int)
        assert tuple(out[mid[1], mid[0]]) == limb_color(COCO, a, b), (a, b)
    # the right wrist (10) is hidden: the right forearm's midpoint stays background
    mid = np.round((kpts[8, :2] + kpts[10, :2]) / 2).astype(int)
    assert tuple(out[mid[1], mid[0]]) == (0, 0, 0)
    assert tuple(out[220, 340]) == (0, 0, 0)
    # a shown joint is a dot in its side's colour
    assert tuple(out[160, 100]) == (255, 160, 40)


def test_bad_keypoint_count_is_rejected() -> None:
    person = PersonPose(np.zeros(4), 1.0, np.zeros((16, 3), np.float32))
    with pytest.raises(ValueError, match="16 keypoints"):
        plan_drawing([person], COCO)
