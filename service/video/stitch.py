"""A long video in segments, and the segments' tracks stitched into one set of ids.

A video is cut where a decoder can start (keyframes, :func:`plan_segments`), so each segment can
run alone (a worker of its own). Segment k *owns* frames [start, end) and *runs* from
``run_start = start - overlap`` (at least the frame before a detection): the frames
[run_start, start) are owned by segment k-1 and are processed twice. Those overlap frames are
where the two segments' tracks meet: :func:`stitch_segments` matches segment k's tracks to the
tracks so far by their boxes (IoU, blended with keypoint OKS as :mod:`.tracking` does) over the
overlap, Hungarian assignment under the tracker's ``min_similarity``. A matched track continues
with segment k's frames from ``start`` on; an unmatched one starts a new id.

Why the stitched result equals one-segment processing: the runner (:mod:`.offline`) detects on
frames whose *absolute* index is a multiple of the detection interval, and on a segment's first
frame. With ``overlap >= detect_interval - 1`` some frame in [run_start, start] is such a
multiple, and from that detection on, segment k computes exactly what a single run computes
(same pixels, same boxes, same crops). So the owned frames agree, and once the overlap matches
each person to itself, the tracks agree. Ids are finally numbered 1, 2, ... in the order the
tracks first appear (frame, then the segment tracker's order), which is how the tracker numbers
them in a single run.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ditepose.model.oks import oks_matrix
from ditepose.service.video.results import TrackSeries
from ditepose.service.video.tracking import TrackerConfig, iou_matrix, optimal_assignment


@dataclass(frozen=True)
class SegmentPlan:
    """Which frames a segment owns [start, end) and where it starts running (``run_start``)."""

    run_start: int
    start: int
    end: int


@dataclass
class SegmentResult:
    """One segment's tracks (ids local to it) over the frames it ran, [run_start, end)."""

    plan: SegmentPlan
    tracks: list[TrackSeries] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        p = self.plan
        return {"run_start": p.run_start, "start": p.start, "end": p.end,
                "tracks": [t.to_dict(0.0) for t in self.tracks]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentResult:
        plan = SegmentPlan(int(data["run_start"]), int(data["start"]), int(data["end"]))
        return cls(plan, [TrackSeries.from_dict(t) for t in data["tracks"]])


def plan_segments(frames: int, keyframes: Sequence[int], segment_frames: int, overlap: int) -> list[SegmentPlan]:
    """Cut [0, frames) at keyframes into segments of at least ``segment_frames`` (the last may be
    half that; a shorter tail joins the segment before it; a video without keyframes to cut at
    stays one segment), each running ``overlap`` frames before its start."""
    if segment_frames < 1 or overlap < 0:
        raise ValueError(f"segment_frames must be >= 1 and overlap >= 0, got {segment_frames}, {overlap}")
    cuts = [0]
    for key in sorted(set(keyframes)):
        if key - cuts[-1] >= segment_frames and frames - key >= max(overlap + 1, segment_frames // 2):
            cuts.append(key)
    bounds = [*cuts, frames]
    return [SegmentPlan(max(0, a - overlap), a, b) for a, b in itertools.pairwise(bounds) if b > a]


def overlap_similarity(old: Sequence[TrackSeries], new: Sequence[TrackSeries], frames: range,
                       config: TrackerConfig, sigmas: np.ndarray | None) -> np.ndarray:
    """[old, new] mean per-frame similarity over ``frames`` (IoU, or IoU and OKS blended); a
    frame where only one of the two tracks is seen counts as 0."""
    sim = np.zeros((len(old), len(new)))
    rows_old = [{f: r for r, f in enumerate(t.frames) if f in frames} for t in old]
    rows_new = [{f: r for r, f in enumerate(t.frames) if f in frames} for t in new]
    for i, (track_a, rows_a) in enumerate(zip(old, rows_old, strict=True)):
        for j, (track_b, rows_b) in enumerate(zip(new, rows_new, strict=True)):
            common = sorted(rows_a.keys() & rows_b.keys())
            either = len(rows_a.keys() | rows_b.keys())
            if not common:
                continue
            total = 0.0
            for f in common:
                box_a, box_b = track_a.boxes[rows_a[f]], track_b.boxes[rows_b[f]]
                value = float(iou_matrix(box_a[None], box_b[None])[0, 0])
                if sigmas is not None and config.oks_weight > 0:
                    oks = oks_matrix(track_a.keypoints[rows_a[f]][None], track_b.keypoints[rows_b[f]][None],
                                     box_a[None, 2] * box_a[None, 3], box_b[None, 2] * box_b[None, 3],
                                     sigmas, vis_thr=config.keypoint_thr)[0, 0]
                    value = (1.0 - config.oks_weight) * value + config.oks_weight * float(oks)
                total += value
            sim[i, j] = total / either
    return sim


def _owned(track: TrackSeries, start: int) -> TrackSeries:
    return track.select([f >= start for f in track.frames])


def _append(track: TrackSeries, more: TrackSeries) -> TrackSeries:
    return TrackSeries(track.track_id, track.frames + more.frames, track.timestamps + more.timestamps,
                       np.concatenate([track.boxes, more.boxes]),
                       np.concatenate([track.keypoints, more.keypoints]),
                       track.box_source + more.box_source, track.scores + more.scores)


def stitch_segments(segments: Sequence[SegmentResult], config: TrackerConfig | None = None,
                    sigmas: Sequence[float] | None = None) -> list[TrackSeries]:
    """One list of tracks for the whole video, ids 1, 2, ... by first appearance (module docstring)."""
    config = config or TrackerConfig()
    sig = None if sigmas is None else np.asarray(sigmas, np.float64)
    ordered = sorted(segments, key=lambda s: s.plan.start)
    for before, after in itertools.pairwise(ordered):
        if before.plan.end != after.plan.start:
            raise ValueError(f"segments must tile the video: one ends at {before.plan.end}, "
                             f"the next starts at {after.plan.start}")
    merged: list[TrackSeries] = []
    births: list[tuple[int, int, int]] = []  # (first frame, segment, local id) of each merged track
    for number, segment in enumerate(ordered):
        owned = [_owned(t, segment.plan.start) for t in segment.tracks]
        overlap = range(segment.plan.run_start, segment.plan.start)
        pairs = optimal_assignment(overlap_similarity(merged, segment.tracks, overlap, config, sig),
                                   config.min_similarity) if merged and len(overlap) else []
        matched = {j: i for i, j in pairs}
        for j, part in enumerate(owned):
            if j in matched:
                merged[matched[j]] = _append(merged[matched[j]], part)
            elif len(part):
                merged.append(part)
                births.append((part.frames[0], number, part.track_id))
    order = sorted(range(len(merged)), key=lambda k: births[k])
    out = []
    for new_id, k in enumerate(order, start=1):
        track = merged[k]
        track.track_id = new_id
        out.append(track)
    return out
