"""Segments cut at keyframes, and tracks stitched across their overlaps into one set of ids."""

from __future__ import annotations

import numpy as np
import pytest

from ditepose.model.keypoints import COCO
from ditepose.service.video.results import TrackSeries
from ditepose.service.video.stitch import SegmentPlan, SegmentResult, plan_segments, stitch_segments
from ditepose.service.video.tracking import PoseTracker

JOINTS = COCO.num_joints


def person_at(frame: int, person: int) -> tuple[np.ndarray, np.ndarray]:
    """Where scripted person ``person`` is in ``frame``: box xywh and keypoints inside it."""
    x = 40.0 + 150.0 * person + 1.5 * frame
    box = np.array([x, 60.0 + 10 * person, 50.0, 120.0])
    kpts = np.zeros((JOINTS, 3))
    kpts[:, 0] = x + np.linspace(5, 45, JOINTS)
    kpts[:, 1] = box[1] + np.linspace(5, 115, JOINTS)
    kpts[:, 2] = 0.8
    return box, kpts


def present(frame: int) -> list[int]:
    """Persons 0 and 1 throughout; person 2 enters at frame 37 (inside segment 2's overlap)."""
    return [0, 1] + ([2] if frame >= 37 else [])


def run_tracker(first: int, end: int) -> list[TrackSeries]:
    """Frames [first, end) through a fresh tracker, as one segment's runner would."""
    tracker = PoseTracker(sigmas=COCO.sigmas)
    rows: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for frame in range(first, end):
        people = [person_at(frame, p) for p in present(frame)]
        boxes = np.stack([b for b, _ in people])
        kpts = np.stack([k for _, k in people])
        for i, track_id in enumerate(tracker.update(boxes, kpts)):
            rows.setdefault(track_id, []).append((frame, boxes[i], kpts[i]))
    return [TrackSeries(tid, [f for f, _, _ in r], [f / 30 for f, _, _ in r], np.stack([b for _, b, _ in r]),
                        np.stack([k for _, _, k in r]), ["detected"] * len(r), [0.9] * len(r))
            for tid, r in sorted(rows.items())]


def test_plan_cuts_at_keyframes_with_an_overlap() -> None:
    plans = plan_segments(90, [0, 30, 60], segment_frames=30, overlap=8)
    assert plans == [SegmentPlan(0, 0, 30), SegmentPlan(22, 30, 60), SegmentPlan(52, 60, 90)]
    assert plan_segments(90, [0, 10, 20, 45, 80], segment_frames=30, overlap=5) == [
        SegmentPlan(0, 0, 45), SegmentPlan(40, 45, 90)]
    assert plan_segments(90, [0], segment_frames=30, overlap=5) == [SegmentPlan(0, 0, 90)]
    with pytest.raises(ValueError):
        plan_segments(90, [0], segment_frames=0, overlap=5)


def test_stitched_segments_equal_one_segment() -> None:
    single = stitch_segments([SegmentResult(SegmentPlan(0, 0, 90), run_tracker(0, 90))], sigmas=COCO.sigmas)
    plans = plan_segments(90, [0, 30, 60], 30, 8)
    parts = [SegmentResult(p, run_tracker(p.run_start, p.end)) for p in plans]
    stitched = stitch_segments(parts, sigmas=COCO.sigmas)
    assert [t.track_id for t in stitched] == [1, 2, 3]
    for a, b in zip(single, stitched, strict=True):
        assert (a.track_id, a.frames) == (b.track_id, b.frames)
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        np.testing.assert_array_equal(a.boxes, b.boxes)
    assert stitched[2].frames[0] == 37 and len(stitched[0]) == 90


def test_a_person_who_is_not_in_the_overlap_gets_a_new_id() -> None:
    first = SegmentResult(SegmentPlan(0, 0, 30), run_tracker(0, 30))
    second_tracks = run_tracker(22, 60)
    moved = second_tracks[1]  # person 1, shifted far away after the cut: not the same person
    moved.boxes[:, 1] += 1000.0
    moved.keypoints[:, :, 1] += 1000.0
    stitched = stitch_segments([first, SegmentResult(SegmentPlan(22, 30, 60), second_tracks)], sigmas=COCO.sigmas)
    assert len(stitched) == 4  # persons 0 and 1 before the cut, then the "moved" one, then person 2
    assert stitched[0].frames == list(range(60))
    assert stitched[1].frames == list(range(30))
    assert stitched[2].frames == list(range(30, 60)) and stitched[2].boxes[0, 1] > 1000


def test_segments_must_tile_the_video() -> None:
    with pytest.raises(ValueError, match="tile"):
        stitch_segments([SegmentResult(SegmentPlan(0, 0, 30)), SegmentResult(SegmentPlan(25, 31, 60))])


def test_segment_results_travel_as_json() -> None:
    part = SegmentResult(SegmentPlan(22, 30, 60), run_tracker(22, 60))
    back = SegmentResult.from_dict(part.to_dict())
    assert back.plan == part.plan
    for a, b in zip(part.tracks, back.tracks, strict=True):
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        assert a.frames == b.frames and a.timestamps == b.timestamps
