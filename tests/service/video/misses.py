"""Detector misses on chosen frames, and the id switches they cause (tests/service/video/test_tracking_misses.py,
bench/video.py).

Why a wrapper: NanoDet finds both riders on every frame of the riders clip, so a miss cannot be
produced with the real detector alone; :class:`MissingDetector` wraps it (the real detections,
computed once per frame) and leaves out the boxes on one rider on chosen frames. It knows which
frame it is given by the decoded pixels (every frame of the clip is hashed once beforehand), so it
works whatever the detection schedule.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

from ditepose.model.detectors import PersonDetector
from ditepose.service.video.decode import decode_frames
from ditepose.service.video.results import TrackSeries
from ditepose.service.video.synthetic import CameraPath
from ditepose.service.video.tracking import iou_matrix

ON_RIDER_IOU = 0.4  # a box this close to where the camera puts a rider is on that rider


def _digest(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


def frame_digests(video: str | Path) -> dict[bytes, int]:
    """Every decoded frame's pixel hash -> its index (RGB, as the runner decodes them)."""
    return {_digest(frame.image): frame.index for frame in decode_frames(video, pixel_format="rgb")}


@dataclass
class MissingDetector:
    """``detector``'s boxes, less those on ``rider_box`` (photo coordinates) on ``missed`` frames."""

    detector: PersonDetector
    frames: dict[bytes, int]  # frame_digests(video)
    camera: CameraPath
    rider_box: tuple[float, ...]
    missed: frozenset[int] = frozenset()
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # frame -> real detections
    calls: list[int] = field(default_factory=list)

    def with_misses(self, missed: Iterable[int]) -> MissingDetector:
        """The same detector (and its cached detections) missing the rider on other frames."""
        return MissingDetector(self.detector, self.frames, self.camera, self.rider_box, frozenset(missed), self.cache)

    def detect(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        frame = self.frames[_digest(image_rgb)]
        self.calls.append(frame)
        if frame not in self.cache:
            self.cache[frame] = self.detector.detect(image_rgb)
        boxes, scores = self.cache[frame]
        if frame not in self.missed or not len(boxes):
            return boxes, scores
        truth = self.camera.box_in_frame(self.rider_box, frame)
        keep = iou_matrix(boxes, truth[None])[:, 0] < ON_RIDER_IOU
        return boxes[keep], scores[keep]


def rider_ids(tracks: list[TrackSeries], camera: CameraPath, rider_box: tuple[float, ...]) -> dict[int, int]:
    """frame -> the id of the track whose box is on the rider there (best IoU >= ON_RIDER_IOU)."""
    best: dict[int, tuple[float, int]] = {}
    for track in tracks:
        for row, frame in enumerate(track.frames):
            iou = float(iou_matrix(track.boxes[row][None], camera.box_in_frame(rider_box, frame)[None])[0, 0])
            if iou >= ON_RIDER_IOU and iou > best.get(frame, (0.0, 0))[0]:
                best[frame] = (iou, track.track_id)
    return {frame: track_id for frame, (_, track_id) in sorted(best.items())}


def id_switches(ids_by_frame: dict[int, int]) -> int:
    """How often the rider's id changes from one frame it is seen in to the next."""
    ids = list(ids_by_frame.values())
    return sum(1 for a, b in pairwise(ids) if a != b)
