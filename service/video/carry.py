"""Person boxes carried from one video frame to the next, so the detector need not run on every frame.

The person detector is the one stage of a top-down pose pipeline whose output the previous
frame almost gives away: a person's box in frame t+1 is close to the box around its keypoints
in frame t. As in rtmlib's ``det_frequency`` (``pose_to_bbox``) and mmpose's box-from-keypoints,
the carried box is the bounding box of the person's keypoints, enlarged about its centre by
``expansion`` (1.25), so a limb moving outwards stays inside the next crop. Keypoints scoring
at or below ``score_thr`` are left out (a badly located wrist would stretch the box); a person
with fewer than ``min_keypoints`` confident keypoints keeps the box it was estimated in (the
keypoints say too little to move it).

One rule goes beyond rtmlib: a keypoint box overlapping the person's previous box by less than
``min_iou`` (0.5) is not believed either, and the previous box is kept. A carried box makes the
next crop, whose keypoints make the box after it, so a pose network that misplaces keypoints
(the demo checkpoint on unseen photos, random weights) would otherwise grow or shrink the box a
little more on every carried frame (seen on a coco-mini photo: a 112 px wide box 313 px wide two
frames later with random weights, 13x6 px with the demo checkpoint). A real person moves far
less between two frames; with a fitting network the two boxes overlap well above 0.5.

Boxes are clipped to the image; one left without area is dropped, which can leave a frame with
no carried box at all: the stream then runs the detector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ditepose.service.video.tracking import iou_matrix


@dataclass(frozen=True)
class CarryConfig:
    """How keypoints become the next frame's box."""

    score_thr: float = 0.3
    min_keypoints: int = 3
    expansion: float = 1.25
    min_iou: float = 0.5  # a keypoint box overlapping the previous box less is not believed (0: always)
    min_size: float = 2.0  # px; a clipped box narrower or lower than this is no box

    def __post_init__(self) -> None:
        if self.min_keypoints < 2:
            raise ValueError(f"min_keypoints must be >= 2 (a box needs two corners), got {self.min_keypoints}")
        if self.expansion < 1.0:
            raise ValueError(f"expansion must be >= 1, got {self.expansion}")
        if not 0.0 <= self.min_iou <= 1.0:
            raise ValueError(f"min_iou must be in [0, 1], got {self.min_iou}")


def clip_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """xywh clipped to the ``width`` x ``height`` image (may come out with no area)."""
    x1, y1 = max(float(box[0]), 0.0), max(float(box[1]), 0.0)
    x2, y2 = min(float(box[0] + box[2]), float(width)), min(float(box[1] + box[3]), float(height))
    return np.array([x1, y1, x2 - x1, y2 - y1], np.float64)


def box_from_keypoints(keypoints: np.ndarray, config: CarryConfig = CarryConfig()) -> np.ndarray | None:
    """The enlarged xywh box around the confident keypoints of one person [K, 3]; None if too few."""
    kpts = np.asarray(keypoints, np.float64).reshape(-1, 3)
    confident = kpts[(kpts[:, 2] > config.score_thr) & np.isfinite(kpts).all(axis=1)]
    if len(confident) < config.min_keypoints:
        return None
    lo, hi = confident[:, :2].min(axis=0), confident[:, :2].max(axis=0)
    centre, half = (lo + hi) / 2.0, (hi - lo) / 2.0 * config.expansion
    return np.array([*(centre - half), *(2.0 * half)], np.float64)


def carried_boxes(
    keypoints: Sequence[np.ndarray],
    previous_boxes: Sequence[np.ndarray],
    width: int,
    height: int,
    config: CarryConfig = CarryConfig(),
) -> np.ndarray:
    """Next frame's boxes [M, 4] xywh (M <= N) from N persons' keypoints [K, 3] and the boxes they
    were estimated in, for a ``width`` x ``height`` image (see the module docstring)."""
    if len(keypoints) != len(previous_boxes):
        raise ValueError(f"{len(keypoints)} keypoint sets for {len(previous_boxes)} boxes")
    out: list[np.ndarray] = []
    for kpts, previous in zip(keypoints, previous_boxes, strict=True):
        previous = np.asarray(previous, np.float64).reshape(4)
        from_kpts = box_from_keypoints(kpts, config)
        if from_kpts is not None and iou_matrix(from_kpts[None], previous[None])[0, 0] < config.min_iou:
            from_kpts = None
        for candidate in (from_kpts, previous):
            if candidate is None or not np.isfinite(candidate).all():
                continue
            box = clip_box(candidate, width, height)
            if box[2] >= config.min_size and box[3] >= config.min_size:
                out.append(box)
                break
    return np.array(out, np.float64).reshape(-1, 4)
