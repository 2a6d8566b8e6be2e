"""Object keypoint similarity and OKS-NMS, exactly as mmpose 0.16 computes them.

The paper's COCO numbers rescore and de-duplicate people with these before
COCOeval, so keeping mmpose's arithmetic (including its quirks) matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from model.keypoints import COCO


def oks_iou(
    g: np.ndarray,
    d: np.ndarray,
    a_g: float,
    a_d: np.ndarray,
    sigmas: np.ndarray | Sequence[float] | None = None,
    vis_thr: float | None = None,
) -> np.ndarray:
    """OKS between one person ``g`` (flat [K*3]) and each row of ``d`` ([M, K*3]).

    ``a_g``/``a_d`` are the person areas. As in mmpose 0.16 the visibility
    filter reads ``list(vg > thr) and list(vd > thr)``, which evaluates to the
    detection mask alone; that quirk is kept on purpose.
    """
    sig = COCO.sigmas_array() if sigmas is None else np.asarray(sigmas, dtype=np.float64)
    variances = (sig * 2) ** 2
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    d = np.asarray(d, dtype=np.float64).reshape(len(d), g.size)
    a_d = np.asarray(a_d, dtype=np.float64).reshape(-1)
    xg, yg, vg = g[0::3], g[1::3], g[2::3]
    ious = np.zeros(len(d), dtype=np.float32)
    for n_d in range(len(d)):
        xd, yd, vd = d[n_d, 0::3], d[n_d, 1::3], d[n_d, 2::3]
        e = ((xd - xg) ** 2 + (yd - yg) ** 2) / variances / ((a_g + a_d[n_d]) / 2 + np.spacing(1)) / 2
        if vis_thr is not None:
            ind = list(vg > vis_thr) and list(vd > vis_thr)
            e = e[np.asarray(ind, dtype=bool)]
        ious[n_d] = np.sum(np.exp(-e)) / len(e) if len(e) != 0 else 0.0
    return ious


def oks_nms(
    kpts_db: Sequence[dict[str, Any]],
    thr: float,
    sigmas: np.ndarray | Sequence[float] | None = None,
    vis_thr: float | None = None,
) -> np.ndarray:
    """Greedy OKS-NMS; each entry has 'keypoints' [K,3], 'score' and 'area'. Returns kept indices."""
    if len(kpts_db) == 0:
        return np.zeros((0,), dtype=np.int64)
    scores = np.array([k["score"] for k in kpts_db], dtype=np.float64)
    kpts = np.array([np.asarray(k["keypoints"], dtype=np.float64).flatten() for k in kpts_db])
    areas = np.array([k["area"] for k in kpts_db], dtype=np.float64)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while len(order) > 0:
        i = int(order[0])
        keep.append(i)
        overlap = oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas, vis_thr)
        inds = np.where(overlap <= thr)[0]
        order = order[inds + 1]
    return np.asarray(keep, dtype=np.int64)
