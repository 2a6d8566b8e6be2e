"""Drawing, golden-image free: limbs join exactly the right joints, hidden joints leave no trace."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ditepose.model.draw import JOINT_COLORS, draw_poses, limb_color, plan_drawing
from ditepose.model.keypoints import COCO, MPII, KeypointSpec
from ditepose.model.pipeline import PersonPose


def _random_person(spec: KeypointSpec, rng: np.random.Generator, size: int = 400) -> PersonPose:
    kpts = np.concatenate([rng.uniform(20, size - 20, (spec.num_joints, 2)), rng.uniform(0.5, 1, (spec.num_joints, 1))], 1)
    return PersonPose(np.array([10, 10, size - 20, size - 20], np.float32), 0.9, kpts.astype(np.float32))


@pytest.mark.parametrize("spec", [COCO, MPII], ids=lambda s: s.name)
def test_every_edge_runs_between_its_two_joints(spec: KeypointSpec) -> None:
    rng = np.random.default_rng(5)
    persons = [_random_person(spec, rng), _random_person(spec, rng)]
    plan = plan_drawing(persons, spec)
    assert len(plan.edges) == 2 * len(spec.skeleton)
    for edge in plan.edges:
        kpts = persons[edge.person].keypoints
        a, b = edge.joints
        assert (a, b) in spec.skeleton
        assert edge.start == (round(float(kpts[a, 0])), round(float(kpts[a, 1])))
        assert edge.end == (round(float(kpts[b, 0])), round(float(kpts[b, 1])))
        assert edge.color == limb_color(spec, a, b)
    assert [e.person for e in plan.edges] == [0] * len(spec.skeleton) + [1] * len(spec.skeleton)


def test_a_single_limb_is_drawn_between_its_joints_and_nowhere_else() -> None:
    """Only the left forearm's joints (elbow 7, wrist 9) are confident: one segment, two dots."""
    kpts = np.zeros((17, 3), np.float32)
    kpts[:, :2] = np.random.default_rng(0).uniform(50, 350, (17, 2))
    kpts[:, 2] = 0.1
    kpts[7] = (80, 300, 0.9)
    kpts[9] = (320, 100, 0.3)  # exactly at the threshold: shown
    person = PersonPose(np.array([0, 0, 400, 400], np.float32), 0.9, kpts)
    out = draw_poses(np.zeros((400, 400, 3), np.uint8), [person], COCO, score_thr=0.3, draw_boxes=False,
                     thickness=3, radius=4)
    colour = np.array(limb_color(COCO, 7, 9))
    for t in (0.2, 0.4, 0.5, 0.6, 0.8):
        x, y = np.round(kpts[7, :2] + t * (kpts[9, :2] - kpts[7, :2])).astype(int)
        assert (out[y, x] == colour).all(), t
    # Nothing is drawn away from the segment and its end dots (anti-aliasing stays within ~2 px).
    expected = np.zeros((400, 400), np.uint8)
    cv2.line(expected, (80, 300), (320, 100), 255, 3 + 4)
    for x, y in ((80, 300), (320, 100)):
        cv2.circle(expected, (x, y), 4 + 3, 255, -1)
    assert not out[expected == 0].any()
    assert tuple(out[300, 80]) == JOINT_COLORS["left"] and tuple(out[100, 320]) == JOINT_COLORS["left"]


def test_hidden_joints_below_the_threshold_or_not_finite() -> None:
    kpts = np.tile(np.array([[100.0, 100.0, 0.9]], np.float32), (17, 1))
    kpts[:, 0] += np.arange(17) * 15
    kpts[3, 2] = np.nextafter(np.float32(0.3), np.float32(0))  # a hair below
    kpts[4, 2] = 0.3  # exactly at: shown
    kpts[5, 0] = np.nan
    kpts[6, 1] = np.inf
    plan = plan_drawing([PersonPose(np.zeros(4, np.float32), 0.9, kpts)], COCO, score_thr=0.3)
    shown = {j.joint for j in plan.joints}
    assert shown == set(range(17)) - {3, 5, 6}
    for edge in plan.edges:
        assert not set(edge.joints) & {3, 5, 6}, edge
    hidden_edges = {e for e in COCO.skeleton if set(e) & {3, 5, 6}}
    assert {e.joints for e in plan.edges} == set(COCO.skeleton) - hidden_edges
    # Raising the threshold above every score hides everything; nothing is drawn at all.
    canvas = np.zeros((300, 400, 3), np.uint8)
    out = draw_poses(canvas, [PersonPose(np.zeros(4, np.float32), 0.9, kpts)], COCO, score_thr=0.95,
                     draw_boxes=False)
    assert not out.any()
