"""The ``mp4`` result: the video with each tracked person's box, skeleton and id drawn, as H.264.

Frames are decoded, drawn on and encoded one at a time (:mod:`.decode`, :mod:`ditepose.model.draw`),
so rendering a long video needs no more memory than a short one. Joints below the result's
score threshold are not drawn (the files keep them, marked; a picture cannot mark them well).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from ditepose.model.draw import draw_poses
from ditepose.model.keypoints import KeypointSpec
from ditepose.service.video.decode import decode_frames, read_index
from ditepose.service.video.results import VideoResult
from ditepose.service.video.synthetic import encode_frames


@dataclass(frozen=True)
class DrawnPerson:
    """What :func:`~ditepose.model.draw.draw_poses` reads of a person."""

    keypoints: np.ndarray
    bbox_xywh: np.ndarray


def _even(image: np.ndarray) -> np.ndarray:
    """H.264 in yuv420p needs even sides: drop a last odd row or column."""
    height, width = image.shape[:2]
    return image[: height - height % 2, : width - width % 2]


def annotated_frames(video: str | Path, result: VideoResult, spec: KeypointSpec) -> Iterator[np.ndarray]:
    """The video's frames (RGB) with the result drawn on them."""
    by_frame = result.persons_by_frame()
    index = read_index(video)
    for frame in decode_frames(video, index=index):
        persons = by_frame.get(frame.index, [])
        drawn = [DrawnPerson(track.keypoints[row], track.boxes[row]) for track, row in persons]
        image = draw_poses(frame.image, drawn, spec, score_thr=result.score_threshold)
        scale = max(0.4, min(image.shape[:2]) / 720)
        for track, row in persons:
            x, y = (round(float(v)) for v in track.boxes[row, :2])
            cv2.putText(image, f"#{track.track_id}", (x + 2, max(12, y - 4)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                        (255, 255, 0), max(1, round(2 * scale)), cv2.LINE_AA)
        yield _even(image)


def render_video(video: str | Path, result: VideoResult, spec: KeypointSpec, out: str | Path) -> Path:
    """Write the annotated video to ``out`` (H.264 in MP4, at the source's average frame rate)."""
    fps = Fraction(result.video.fps).limit_denominator(1001) if result.video.fps > 0 else Fraction(30)
    return encode_frames(out, annotated_frames(video, result, spec), "h264", fps=fps)
