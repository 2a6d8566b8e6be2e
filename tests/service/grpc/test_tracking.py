"""Unit tests of the stream tracker (stable ids, birth/death) and the One Euro filter."""

from __future__ import annotations

import numpy as np
import pytest

from ditepose.model.keypoints import COCO
from ditepose.service.video.smoothing import KeypointSmoother, OneEuroConfig, OneEuroFilter
from ditepose.service.video.tracking import (
    PoseTracker,
    TrackerConfig,
    greedy_assignment,
    iou_matrix,
    optimal_assignment,
)


def _pose(box: list[float], rng: np.random.Generator | None = None) -> np.ndarray:
    """17 keypoints spread over the box (a crude upright person)."""
    x, y, w, h = box
    fx = np.linspace(0.3, 0.7, 17)
    fy = np.linspace(0.05, 0.95, 17)
    kpts = np.stack([x + fx * w, y + fy * h, np.full(17, 0.9)], axis=1)
    if rng is not None:
        kpts[:, :2] += rng.normal(0, 1.0, (17, 2))
    return kpts


def test_iou_matrix_values() -> None:
    iou = iou_matrix(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 10, 10], [20, 20, 5, 5]]))
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0]])


def test_assignments_agree_and_refuse_weak_pairs() -> None:
    sim = np.array([[0.9, 0.8], [0.85, 0.1]])
    # Greedy takes (0,0) first and leaves (1,1) under the bar; optimal pairs (0,1)+(1,0).
    assert greedy_assignment(sim, 0.3) == [(0, 0)]
    assert sorted(optimal_assignment(sim, 0.3)) in ([(0, 0)], [(0, 1), (1, 0)])
    assert greedy_assignment(np.zeros((0, 3)), 0.3) == []


def test_two_people_crossing_keep_their_ids() -> None:
    tracker = PoseTracker(TrackerConfig(), sigmas=COCO.sigmas)
    rng = np.random.default_rng(0)
    first = None
    for frame in range(40):
        a = [50.0 + 8 * frame, 100.0, 60.0, 160.0]  # moves right
        b = [400.0 - 8 * frame, 110.0, 60.0, 160.0]  # moves left, crosses a around frame 22
        order = [a, b] if frame % 2 == 0 else [b, a]  # detector order must not matter
        ids = tracker.update(np.array(order), np.stack([_pose(p, rng) for p in order]))
        by_person = dict(zip(("a", "b") if frame % 2 == 0 else ("b", "a"), ids, strict=True))
        if first is None:
            first = by_person
            assert sorted(ids) == [1, 2]
        # Velocity prediction carries the ids through the crossing.
        assert by_person == first, f"ids swapped at frame {frame}"


def test_birth_and_death_after_max_age() -> None:
    tracker = PoseTracker(TrackerConfig(max_age=2))
    box = [[10.0, 10.0, 50.0, 100.0]]
    assert tracker.update(box) == [1]
    assert tracker.update(np.zeros((0, 4))) == []  # age 1
    assert tracker.update(np.zeros((0, 4))) == []  # age 2: still remembered
    assert tracker.update(box) == [1]  # comes back within max_age: same id
    for _ in range(3):
        tracker.update(np.zeros((0, 4)))
    assert tracker.live_ids == []
    assert tracker.update(box) == [2]  # a new track; ids are never reused


def test_far_jump_starts_new_track() -> None:
    tracker = PoseTracker(TrackerConfig(use_velocity=False))
    assert tracker.update([[0.0, 0.0, 20.0, 20.0]]) == [1]
    assert tracker.update([[500.0, 500.0, 20.0, 20.0]]) == [2]


def test_bad_keypoint_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="keypoints"):
        PoseTracker().update([[0.0, 0.0, 1.0, 1.0]], np.zeros((2, 17, 3)))
    with pytest.raises(ValueError, match="max_age"):
        TrackerConfig(max_age=-1)


def test_one_euro_reduces_jitter_of_a_still_point_and_follows_a_move() -> None:
    rng = np.random.default_rng(1)
    filt = OneEuroFilter(OneEuroConfig(min_cutoff=1.0, beta=0.05))
    noisy = 100.0 + rng.normal(0, 2.0, 300)
    out = np.array([filt(np.array([v]), i / 30.0)[0] for i, v in enumerate(noisy)])
    assert np.std(out[30:]) < 0.4 * np.std(noisy[30:])
    # A step of 200 px: the speed term opens the filter, so it is followed within a few frames.
    for i in range(300, 320):
        last = filt(np.array([300.0]), i / 30.0)[0]
    assert abs(last - 300.0) < 5.0


def test_one_euro_first_sample_passes_and_config_checks() -> None:
    filt = OneEuroFilter()
    np.testing.assert_array_equal(filt(np.array([[1.0, 2.0]]), 0.0), [[1.0, 2.0]])
    with pytest.raises(ValueError, match="shape"):
        filt(np.array([1.0]), 0.1)
    with pytest.raises(ValueError):
        OneEuroConfig(beta=-1.0)
    with pytest.raises(ValueError):
        OneEuroConfig(min_cutoff=0.0)


def test_keypoint_smoother_per_track_and_retain() -> None:
    smoother = KeypointSmoother(OneEuroConfig(min_cutoff=0.5, beta=0.0))
    k = _pose([0.0, 0.0, 50.0, 100.0])
    smoother.smooth(1, k, 0.0)
    moved = k.copy()
    moved[:, 0] += 10
    out = smoother.smooth(1, moved, 1 / 30)
    assert np.all(out[:, 0] > k[:, 0]) and np.all(out[:, 0] < moved[:, 0])  # lags behind the jump
    np.testing.assert_array_equal(out[:, 2], moved[:, 2])  # scores untouched
    np.testing.assert_array_equal(smoother.smooth(2, moved, 1 / 30), moved)  # new track: no history
    smoother.retain([2])
    assert set(smoother.filters) == {2}
