"""OKS formulas against hand-computed values and pycocotools."""

from __future__ import annotations

import numpy as np

from ditepose.model.keypoints import COCO
from ditepose.model.oks import coco_oks, oks_matrix, oks_nms_indices


def _pose(rng: np.random.Generator) -> np.ndarray:
    xy = rng.uniform(0, 300, size=(17, 2))
    return np.column_stack([xy, rng.uniform(0.1, 1, size=17)])


def test_oks_matrix_by_hand() -> None:
    rng = np.random.default_rng(0)
    a, b = _pose(rng), _pose(rng)
    sig = COCO.sigmas_array()
    var = (2 * sig) ** 2
    d2 = ((a[:, :2] - b[:, :2]) ** 2).sum(1)
    expected = np.exp(-d2 / var / ((1000 + 3000) / 2 + np.spacing(1)) / 2).mean()
    got = oks_matrix(a[None], b[None], [1000], [3000], sig)
    np.testing.assert_allclose(got, [[expected]], rtol=1e-12)
    assert oks_matrix(a[None], a[None], [1000], [1000], sig)[0, 0] == 1.0
    masked = oks_matrix(a[None], b[None], [1000], [3000], sig, vis_thr=2.0)
    assert masked[0, 0] == 0.0


def test_oks_nms_keeps_distinct_and_best() -> None:
    rng = np.random.default_rng(1)
    p = _pose(rng)
    kpts = np.stack([p, p + np.array([0.5, 0.5, 0]), p + np.array([150, 0, 0])])
    keep = oks_nms_indices(kpts, [0.5, 0.9, 0.3], [5000] * 3, thr=0.9, sigmas=COCO.sigmas)
    np.testing.assert_array_equal(keep, [1, 2])
    assert len(oks_nms_indices(np.zeros((0, 17, 3)), [], [], 0.9, COCO.sigmas)) == 0


def test_coco_oks_matches_pycocotools() -> None:
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(2)
    gt_xy = rng.uniform(50, 250, size=(17, 2))
    vis = rng.integers(0, 3, size=17)
    gt = np.column_stack([gt_xy, vis]).astype(np.float64)
    gt[vis == 0, :2] = 0
    dets = np.stack([np.column_stack([gt_xy + rng.normal(0, s, size=(17, 2)), np.ones(17)]) for s in (2, 10)])
    area, bbox = 12000.0, [40, 40, 220, 220]

    ev = COCOeval(iouType="keypoints")
    ev.params.kpt_oks_sigmas = COCO.sigmas_array()
    ev.params.maxDets = [20]
    ev._gts = {(1, 1): [{"keypoints": gt.ravel().tolist(), "area": area, "bbox": bbox}]}
    ev._dts = {(1, 1): [{"keypoints": d.ravel().tolist(), "score": 1.0 - i * 0.1} for i, d in enumerate(dets)]}
    expected = ev.computeOks(1, 1)[:, 0]
    np.testing.assert_allclose(coco_oks(gt, area, bbox, dets, COCO.sigmas), expected, rtol=1e-10)
    # no labelled joints: distance to the enlarged box
    gt0 = np.zeros((17, 3))
    ev._gts = {(1, 1): [{"keypoints": gt0.ravel().tolist(), "area": area, "bbox": bbox}]}
    np.testing.assert_allclose(
        coco_oks(gt0, area, bbox, dets, COCO.sigmas), ev.computeOks(1, 1)[:, 0], rtol=1e-10
    )
