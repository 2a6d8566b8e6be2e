"""Object keypoint similarity (OKS) and OKS non-maximum suppression.

Shared by the inference pipeline (duplicate suppression), evaluation and tracking so the
formula lives in one place. Two conventions exist and both are here:

* :func:`oks_matrix` / :func:`oks_nms_indices` follow mmpose 0.16 ``oks_iou``/``oks_nms`` (the
  area is the mean of the two poses' areas), as used by mmpose's COCO evaluation;
* :func:`coco_oks` follows pycocotools ``computeOks`` (ground-truth area and
  visibility; unlabelled ground truth falls back to the distance to its box).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_EPS = np.spacing(1)


def _as_kpts(kpts: np.ndarray) -> np.ndarray:
    arr = np.asarray(kpts, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[-1] not in (2, 3):
        raise ValueError(f"keypoints must be [N, K, 2|3], got shape {arr.shape}")
    return arr


def oks_matrix(
    kpts_a: np.ndarray,
    kpts_b: np.ndarray,
    areas_a: Sequence[float] | np.ndarray,
    areas_b: Sequence[float] | np.ndarray,
    sigmas: Sequence[float] | np.ndarray,
    vis_thr: float | None = None,
) -> np.ndarray:
    """Pairwise OKS [A, B] between two sets of poses [A, K, 3] and [B, K, 3] (mmpose convention).

    With ``vis_thr`` only joints scored above it in both poses count (mmpose meant this
    but its list-``and`` kept only the second pose's mask); no such joint -> OKS 0.
    """
    a, b = _as_kpts(kpts_a), _as_kpts(kpts_b)
    sig = np.asarray(sigmas, dtype=np.float64)
    if a.shape[1] != len(sig) or b.shape[1] != len(sig):
        raise ValueError(f"{len(sig)} sigmas for poses with {a.shape[1]} and {b.shape[1]} joints")
    var = (sig * 2) ** 2
    d2 = ((a[:, None, :, :2] - b[None, :, :, :2]) ** 2).sum(-1)  # [A, B, K]
    area = (np.asarray(areas_a, np.float64)[:, None] + np.asarray(areas_b, np.float64)[None, :]) / 2
    e = d2 / var / (area[..., None] + _EPS) / 2
    if vis_thr is None or a.shape[-1] < 3:
        return np.exp(-e).mean(-1) if e.shape[-1] else np.zeros(e.shape[:2])
    mask = (a[:, None, :, 2] > vis_thr) & (b[None, :, :, 2] > vis_thr)
    count = mask.sum(-1)
    total = np.where(mask, np.exp(-e), 0.0).sum(-1)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def oks_nms_indices(
    kpts: np.ndarray,
    scores: Sequence[float] | np.ndarray,
    areas: Sequence[float] | np.ndarray,
    thr: float,
    sigmas: Sequence[float] | np.ndarray,
    vis_thr: float | None = None,
) -> np.ndarray:
    """Greedy OKS-NMS (mmpose 0.16): indices to keep, best score first.

    A pose is dropped when its OKS with an already kept, higher-scored pose exceeds ``thr``.
    """
    poses = _as_kpts(kpts) if len(kpts) else np.zeros((0, len(sigmas), 3))
    scores = np.asarray(scores, dtype=np.float64)
    if len(poses) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(scores) != len(poses) or len(areas) != len(poses):
        raise ValueError("kpts, scores and areas must have the same length")
    sim = oks_matrix(poses, poses, areas, areas, sigmas, vis_thr)
    order = np.argsort(scores, kind="stable")[::-1]
    suppressed = np.zeros(len(poses), dtype=bool)
    keep: list[int] = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= sim[i] > thr
    return np.asarray(keep, dtype=np.int64)


def coco_oks(
    gt_kpts: np.ndarray,
    gt_area: float,
    gt_bbox_xywh: Sequence[float],
    det_kpts: np.ndarray,
    sigmas: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """OKS of detections [D, K, 3] against one ground truth [K, 3] exactly as pycocotools computes it."""
    gt = np.asarray(gt_kpts, dtype=np.float64).reshape(-1, 3)
    dets = _as_kpts(det_kpts)
    var = (np.asarray(sigmas, dtype=np.float64) * 2) ** 2
    visible = gt[:, 2] > 0
    if visible.any():
        dx = dets[..., 0] - gt[None, :, 0]
        dy = dets[..., 1] - gt[None, :, 1]
    else:
        x, y, w, h = (float(v) for v in gt_bbox_xywh)
        x0, x1, y0, y1 = x - w, x + w * 2, y - h, y + h * 2
        dx = np.maximum(0, x0 - dets[..., 0]) + np.maximum(0, dets[..., 0] - x1)
        dy = np.maximum(0, y0 - dets[..., 1]) + np.maximum(0, dets[..., 1] - y1)
    e = (dx**2 + dy**2) / var / (gt_area + _EPS) / 2
    if visible.any():
        e = e[:, visible]
    return np.exp(-e).sum(-1) / e.shape[-1]
