"""COCO keypoint AP with the paper's protocol (mmpose 0.16 ``TopDownCocoDataset.evaluate``).

Per person: score = box score x mean of the joint scores above ``vis_thr``; then
OKS-NMS per image at ``oks_thr`` with the COCO sigmas and the person's area; then
pycocotools' ``COCOeval`` with iouType 'keypoints'.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ditepose.model.keypoints import COCO
from ditepose.model.oks import oks_nms_indices

STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def _load_gt(ann_file: str | Path | Any) -> Any:
    from pycocotools.coco import COCO as CocoApi

    if not isinstance(ann_file, str | Path):
        return ann_file  # already a pycocotools COCO object
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    with contextlib.redirect_stdout(io.StringIO()):
        return CocoApi(str(path))


def rescore_and_nms(
    predictions: Iterable[Mapping[str, Any]],
    num_joints: int,
    sigmas: np.ndarray,
    vis_thr: float = 0.2,
    oks_thr: float = 0.9,
    use_nms: bool = True,
) -> list[dict[str, Any]]:
    """mmpose's rescoring and per-image OKS-NMS; returns COCO result dicts."""
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    seen: set[Any] = set()
    for pred in predictions:
        bbox_id = pred.get("bbox_id")
        if bbox_id is not None:
            if bbox_id in seen:  # mmpose's _sort_and_unique_bboxes
                continue
            seen.add(bbox_id)
        kpts = np.asarray(pred["keypoints"], dtype=np.float64).reshape(-1, 3)
        if kpts.shape[0] != num_joints:
            raise ValueError(f"prediction has {kpts.shape[0]} keypoints, expected {num_joints}")
        by_image[int(pred["image_id"])].append(
            {"keypoints": kpts, "box_score": float(pred.get("box_score", 1.0)),
             "area": float(pred["area"]), "image_id": int(pred["image_id"])}
        )
    results: list[dict[str, Any]] = []
    for image_id, people in by_image.items():
        for person in people:
            joint_scores = person["keypoints"][:, 2]
            valid = joint_scores > vis_thr
            kpt_score = float(joint_scores[valid].sum() / valid.sum()) if valid.any() else 0.0
            person["score"] = kpt_score * person["box_score"]
        if use_nms:
            keep = oks_nms_indices(np.stack([p["keypoints"] for p in people]), [p["score"] for p in people],
                           [p["area"] for p in people], oks_thr, sigmas)
        else:
            keep = np.arange(len(people))
        for k in keep:
            person = people[int(k)]
            results.append({
                "image_id": image_id,
                "category_id": 1,
                "keypoints": person["keypoints"].reshape(-1).tolist(),
                "score": float(person["score"]),
            })
    return results


def evaluate_coco(
    predictions: Iterable[Mapping[str, Any]],
    ann_file: str | Path | Any,
    vis_thr: float = 0.2,
    oks_thr: float = 0.9,
    use_nms: bool = True,
    sigmas: np.ndarray | None = None,
    img_ids: list[int] | None = None,
) -> dict[str, float]:
    """COCO keypoint AP/AR of ``predictions`` against ``ann_file`` (path or pycocotools COCO).

    Each prediction: ``{image_id, keypoints: K x [x, y, score], box_score, area}``
    (optional ``bbox_id`` de-duplicates as mmpose does). ``img_ids`` restricts scoring to those
    images (for subsets); by default every annotated image counts, as in mmpose. pycocotools' prints
    are captured.
    """
    from pycocotools.cocoeval import COCOeval

    gt = _load_gt(ann_file)
    sig = COCO.sigmas_array() if sigmas is None else np.asarray(sigmas, dtype=np.float64)
    results = rescore_and_nms(predictions, len(sig), sig, vis_thr, oks_thr, use_nms)
    if not results:
        return dict.fromkeys(STAT_NAMES, 0.0)
    unknown = {r["image_id"] for r in results} - set(gt.getImgIds())
    if unknown:
        raise ValueError(f"predictions for image ids not in the annotations: {sorted(unknown)[:5]}")
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        coco_eval = COCOeval(gt, dt, "keypoints")
        coco_eval.params.kpt_oks_sigmas = sig
        coco_eval.params.useSegm = None
        if img_ids is not None:
            coco_eval.params.imgIds = sorted(img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    # pycocotools reports -1 where a category/area has no ground truth; keep it as-is for honesty.
    return {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats, strict=True)}
