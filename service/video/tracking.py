"""Person tracking across video frames: stable ids from box IoU blended with keypoint OKS.

Each frame's persons are matched to the live tracks (Hungarian assignment via scipy when it
is installed, else greedy best-first; both refuse pairs under ``min_similarity``). A track's
box is predicted forward with its last velocity, so a person moving steadily keeps its id
even when consecutive boxes overlap little. Unmatched persons start new tracks; a track
unmatched for more than ``max_age`` frames ends and its id is never reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ditepose.model.oks import oks_matrix


@dataclass(frozen=True)
class TrackerConfig:
    """How strict matching is and how long a lost person is remembered."""

    min_similarity: float = 0.3
    max_age: int = 30
    oks_weight: float = 0.5  # similarity = (1 - w) * IoU + w * OKS when both poses have keypoints
    keypoint_thr: float = 0.05  # joints scored at or below this are ignored by OKS
    use_velocity: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"min_similarity must be in [0, 1], got {self.min_similarity}")
        if self.max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {self.max_age}")
        if not 0.0 <= self.oks_weight <= 1.0:
            raise ValueError(f"oks_weight must be in [0, 1], got {self.oks_weight}")


@dataclass
class Track:
    """One person followed across frames."""

    track_id: int
    box: np.ndarray  # [4] xywh of the last match
    keypoints: np.ndarray | None  # [K, 3] of the last match
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))  # box centre, px per frame
    age: int = 0  # frames since the last match
    hits: int = 1

    def predicted_box(self, use_velocity: bool) -> np.ndarray:
        if not use_velocity:
            return self.box
        shift = self.velocity * (self.age + 1)
        return np.array([self.box[0] + shift[0], self.box[1] + shift[1], self.box[2], self.box[3]])


def iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU [A, B] of xywh boxes."""
    a = np.asarray(boxes_a, np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, np.float64).reshape(-1, 4)
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def greedy_assignment(similarity: np.ndarray, min_similarity: float) -> list[tuple[int, int]]:
    """Best pairs first; each row and column used at most once; pairs under the bar refused."""
    pairs: list[tuple[int, int]] = []
    if similarity.size == 0:
        return pairs
    order = np.argsort(-similarity, axis=None, kind="stable")
    used_rows: set[int] = set()
    used_cols: set[int] = set()
    for flat in order:
        r, c = divmod(int(flat), similarity.shape[1])
        if similarity[r, c] < min_similarity:
            break
        if r in used_rows or c in used_cols:
            continue
        used_rows.add(r)
        used_cols.add(c)
        pairs.append((r, c))
    return pairs


def optimal_assignment(similarity: np.ndarray, min_similarity: float) -> list[tuple[int, int]]:
    """Hungarian assignment (scipy) maximising total similarity; greedy when scipy is missing."""
    if similarity.size == 0:
        return []
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return greedy_assignment(similarity, min_similarity)
    rows, cols = linear_sum_assignment(-similarity)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if similarity[r, c] >= min_similarity]


class PoseTracker:
    """Assigns stable track ids to the persons of consecutive frames (one tracker per stream)."""

    def __init__(self, config: TrackerConfig | None = None, sigmas: Sequence[float] | None = None) -> None:
        self.config = config or TrackerConfig()
        self.sigmas = None if sigmas is None else np.asarray(sigmas, np.float64)
        self.tracks: list[Track] = []
        self._next_id = 1

    def reset(self) -> None:
        self.tracks = []

    def similarity(self, boxes: np.ndarray, keypoints: np.ndarray | None) -> np.ndarray:
        """[T, N] similarity of live tracks to this frame's persons."""
        cfg = self.config
        if not self.tracks or len(boxes) == 0:
            return np.zeros((len(self.tracks), len(boxes)))
        predicted = np.stack([t.predicted_box(cfg.use_velocity) for t in self.tracks])
        sim = iou_matrix(predicted, boxes)
        have_kpts = (
            keypoints is not None
            and self.sigmas is not None
            and cfg.oks_weight > 0
            and all(t.keypoints is not None for t in self.tracks)
        )
        if have_kpts:
            assert keypoints is not None and self.sigmas is not None
            prev = np.stack([self._shifted_keypoints(t) for t in self.tracks])
            areas_a = predicted[:, 2] * predicted[:, 3]
            areas_b = boxes[:, 2] * boxes[:, 3]
            oks = oks_matrix(prev, keypoints, areas_a, areas_b, self.sigmas, vis_thr=cfg.keypoint_thr)
            sim = (1.0 - cfg.oks_weight) * sim + cfg.oks_weight * oks
        return sim

    def _shifted_keypoints(self, track: Track) -> np.ndarray:
        kpts = np.array(track.keypoints, np.float64, copy=True)
        if self.config.use_velocity:
            kpts[:, :2] += track.velocity * (track.age + 1)
        return kpts

    def update(self, boxes: np.ndarray | Sequence[Sequence[float]], keypoints: np.ndarray | None = None) -> list[int]:
        """Match this frame's persons (boxes [N, 4] xywh, keypoints [N, K, 3]); return their ids."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        kpts = None if keypoints is None else np.asarray(keypoints, np.float64)
        if kpts is not None and (kpts.ndim != 3 or len(kpts) != len(boxes)):
            raise ValueError(f"keypoints must be [N, K, 3] for {len(boxes)} boxes, got {kpts.shape}")
        cfg = self.config
        pairs = optimal_assignment(self.similarity(boxes, kpts), cfg.min_similarity)
        ids = [0] * len(boxes)
        matched_tracks: set[int] = set()
        for t_index, d_index in pairs:
            track = self.tracks[t_index]
            new_centre = boxes[d_index, :2] + boxes[d_index, 2:] / 2
            old_centre = track.box[:2] + track.box[2:] / 2
            step = (new_centre - old_centre) / (track.age + 1)
            track.velocity = step if track.hits == 1 else 0.5 * track.velocity + 0.5 * step
            track.box = boxes[d_index].copy()
            track.keypoints = None if kpts is None else kpts[d_index].copy()
            track.age = 0
            track.hits += 1
            ids[d_index] = track.track_id
            matched_tracks.add(t_index)
        survivors = []
        for index, track in enumerate(self.tracks):
            if index not in matched_tracks:
                track.age += 1
                if track.age > cfg.max_age:
                    continue
            survivors.append(track)
        self.tracks = survivors
        for d_index, track_id in enumerate(ids):
            if track_id == 0:
                new = Track(self._next_id, boxes[d_index].copy(), None if kpts is None else kpts[d_index].copy())
                self._next_id += 1
                self.tracks.append(new)
                ids[d_index] = new.track_id
        return ids

    @property
    def live_ids(self) -> list[int]:
        return [t.track_id for t in self.tracks]
