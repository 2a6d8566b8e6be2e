"""Affine geometry of the top-down pipeline, in mmpose 0.x conventions.

A person box is described by ``center`` (x, y in pixels) and ``scale`` (box size
in units of 200 px, already padded). These functions map between image pixels
and the network's input crop.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

PIXEL_STD = 200.0


def _rotate_point(point: np.ndarray, angle_rad: float) -> np.ndarray:
    sn, cs = np.sin(angle_rad), np.cos(angle_rad)
    return np.array([point[0] * cs - point[1] * sn, point[0] * sn + point[1] * cs])


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The point that makes a right angle with a-b at b (counter-clockwise)."""
    direction = a - b
    return b + np.array([-direction[1], direction[0]], dtype=np.float32)


def get_affine_transform(
    center: Sequence[float] | np.ndarray,
    scale: Sequence[float] | np.ndarray,
    rot_deg: float,
    output_size_wh: Sequence[int] | np.ndarray,
    inv: bool = False,
    shift: Sequence[float] = (0.0, 0.0),
) -> np.ndarray:
    """2x3 matrix mapping the box (center, scale, rotation) onto an output of ``output_size_wh``.

    With ``inv=True`` the matrix maps the output back onto the image. Matches
    mmpose 0.16's ``get_affine_transform`` (float32 points, ``cv2.getAffineTransform``).
    """
    center = np.asarray(center, dtype=np.float32)
    scale_px = np.asarray(scale, dtype=np.float32) * PIXEL_STD
    shift_arr = np.asarray(shift, dtype=np.float32)
    src_w = scale_px[0]
    dst_w, dst_h = float(output_size_wh[0]), float(output_size_wh[1])

    rot_rad = np.pi * rot_deg / 180.0
    src_dir = _rotate_point(np.array([0.0, src_w * -0.5]), rot_rad)
    dst_dir = np.array([0.0, dst_w * -0.5])

    src = np.zeros((3, 2), dtype=np.float32)
    src[0] = center + scale_px * shift_arr
    src[1] = center + src_dir + scale_px * shift_arr
    src[2] = _third_point(src[0], src[1])

    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir
    dst[2] = _third_point(dst[0], dst[1])

    if inv:
        return cv2.getAffineTransform(dst.astype(np.float32), src.astype(np.float32))
    return cv2.getAffineTransform(src.astype(np.float32), dst.astype(np.float32))


def affine_transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to an [..., 2] array of points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def box_to_center_scale(
    box_xywh: Sequence[float] | np.ndarray,
    aspect_ratio: float,
    padding: float = 1.25,
) -> tuple[np.ndarray, np.ndarray]:
    """mmpose's ``_xywh2cs``: box -> (center, scale), grown to ``aspect_ratio`` (w/h) and padded."""
    x, y, w, h = (float(v) for v in box_xywh[:4])
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect_ratio * h:
        h = w * 1.0 / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w / PIXEL_STD, h / PIXEL_STD], dtype=np.float32) * padding
    return center, scale
