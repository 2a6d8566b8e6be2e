"""Where an evaluation loses points: per-person OKS and per-joint accuracy, and their plots.

The AP table says how good a model is; these say which people and which joints it misses.
Used by ``ditepose evaluate --plots DIR`` through :func:`write_evaluation_plots`.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ditepose.model.keypoints import COCO, KeypointSpec
from ditepose.model.oks import coco_oks

_EPS = np.spacing(1)
MPII_GROUPS = ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle")


@dataclass(frozen=True)
class EvalBreakdown:
    """One OKS per ground-truth person and one accuracy per joint."""

    oks: np.ndarray  # [P] best one-to-one matched prediction's OKS; 0 when unmatched
    per_joint: dict[str, float]  # joint name -> share of labelled joints with similarity >= ks_thr
    joint_counts: dict[str, int]  # labelled occurrences per joint


def _load_coco(gt: str | Path | Any) -> Any:
    if not isinstance(gt, str | Path):
        return gt  # a pycocotools COCO object
    from pycocotools.coco import COCO as CocoApi

    path = Path(gt)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    with contextlib.redirect_stdout(io.StringIO()):
        return CocoApi(str(path))


def _greedy_match(sim: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one (gt, pred) pairs, most similar first (as COCO matching is greedy too)."""
    pairs: list[tuple[int, int]] = []
    if sim.size == 0:
        return pairs
    sim = sim.copy()
    for _ in range(min(sim.shape)):
        g, p = np.unravel_index(int(np.argmax(sim)), sim.shape)
        if sim[g, p] < 0:
            break
        pairs.append((int(g), int(p)))
        sim[g, :] = -1
        sim[:, p] = -1
    return pairs


def coco_breakdown(
    predictions: Iterable[Mapping[str, Any]],
    coco_gt: str | Path | Any,
    spec: KeypointSpec = COCO,
    ks_thr: float = 0.5,
) -> EvalBreakdown:
    """Per-person OKS (pycocotools' formula) and per-joint accuracy of ``predictions``.

    Ground truth: non-crowd people with labelled keypoints. Each is matched one-to-one to a
    prediction of its image by OKS; a joint counts as correct when its keypoint similarity
    ``exp(-d^2 / (2 area (2 sigma)^2))`` reaches ``ks_thr`` (0.5 ~ the AP50 tolerance per joint).
    Predictions: ``{image_id, keypoints: K x [x, y, score]}`` as ``ditepose.training.evaluate.predict`` makes.
    """
    gt = _load_coco(coco_gt)
    sigmas = spec.sigmas_array()
    var = (2 * sigmas) ** 2
    by_image: dict[int, list[np.ndarray]] = defaultdict(list)
    for pred in predictions:
        kpts = np.asarray(pred["keypoints"], dtype=np.float64).reshape(-1, 3)
        if len(kpts) != spec.num_joints:
            raise ValueError(f"prediction has {len(kpts)} keypoints; {spec.name} has {spec.num_joints}")
        by_image[int(pred["image_id"])].append(kpts)
    hits = np.zeros(spec.num_joints)
    counts = np.zeros(spec.num_joints, dtype=np.int64)
    oks_all: list[float] = []
    for image_id in sorted(gt.getImgIds()):
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[image_id], iscrowd=False)) if a.get("num_keypoints", 0) > 0]
        if not anns:
            continue
        gts = [np.asarray(a["keypoints"], dtype=np.float64).reshape(-1, 3) for a in anns]
        dets = np.stack(by_image[image_id]) if by_image.get(image_id) else np.zeros((0, spec.num_joints, 3))
        sim = np.stack([coco_oks(g, a["area"], a["bbox"], dets, sigmas) for g, a in zip(gts, anns, strict=True)]) \
            if len(dets) else np.zeros((len(anns), 0))
        matched = dict(_greedy_match(sim))
        for g, (kp, ann) in enumerate(zip(gts, anns, strict=True)):
            labelled = kp[:, 2] > 0
            counts += labelled
            if g not in matched:
                oks_all.append(0.0)
                continue
            p = matched[g]
            oks_all.append(float(sim[g, p]))
            d2 = ((dets[p, :, :2] - kp[:, :2]) ** 2).sum(-1)
            ks = np.exp(-d2 / var / (float(ann["area"]) + _EPS) / 2)
            hits += labelled & (ks >= ks_thr)
    if not oks_all:
        raise ValueError("the ground truth has no person with labelled keypoints")
    per_joint = {
        name: float(hits[j] / counts[j]) for j, name in enumerate(spec.joint_names) if counts[j] > 0
    }
    return EvalBreakdown(
        oks=np.asarray(oks_all, dtype=np.float64),
        per_joint=per_joint,
        joint_counts={name: int(counts[j]) for j, name in enumerate(spec.joint_names)},
    )


def write_evaluation_plots(
    out_dir: str | Path,
    dataset: str,
    predictions: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, float],
    coco_gt: str | Path | Any | None = None,
) -> list[Path]:
    """The plots of ``ditepose evaluate --plots DIR``; returns the files written.

    COCO (needs ``coco_gt``: the dataset's pycocotools object or annotation file):
    ``per_joint.png`` (accuracy at keypoint similarity 0.5) and ``oks_hist.png``.
    MPII: ``per_joint.png`` from the PCKh table's joint groups (Head ... Ankle).
    """
    from ditepose.training.plots import plot_oks_histogram, plot_per_joint

    out = Path(out_dir)
    if dataset == "coco":
        if coco_gt is None:
            raise ValueError("COCO plots need the ground truth (coco_gt)")
        breakdown = coco_breakdown(predictions, coco_gt)
        return [
            plot_per_joint(breakdown.per_joint, out / "per_joint.png",
                           title="Per-joint accuracy (keypoint similarity >= 0.5)", xlabel="fraction correct"),
            plot_oks_histogram(breakdown.oks, out / "oks_hist.png"),
        ]
    if dataset == "mpii":
        groups = {name: float(metrics[name]) for name in MPII_GROUPS if name in metrics}
        return [plot_per_joint(groups, out / "per_joint.png", title="PCKh@0.5 per joint group", xlabel="PCKh (%)")]
    raise ValueError(f"no evaluation plots for dataset {dataset!r} (coco or mpii)")
