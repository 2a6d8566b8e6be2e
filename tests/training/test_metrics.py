"""COCO AP (mmpose protocol) and MPII PCKh (mmpose arithmetic) on known answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ditepose.model.keypoints import COCO
from ditepose.training.coco_eval import STAT_NAMES, evaluate_coco, rescore_and_nms
from ditepose.training.mpii_eval import evaluate_mpii, save_mpii_gt


def gt_as_predictions(ann_file: Path, score: float = 1.0) -> list[dict[str, Any]]:
    """The annotated people with keypoints as perfect predictions (scores AP 1 by construction)."""
    doc = json.loads(ann_file.read_text())
    preds: list[dict[str, Any]] = []
    for ann in doc["annotations"]:
        if ann.get("iscrowd", 0) or ann.get("num_keypoints", 0) == 0:
            continue
        kpts = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        kpts[:, 2] = np.where(kpts[:, 2] > 0, score, 0.0)
        preds.append({"image_id": ann["image_id"], "keypoints": kpts.tolist(),
                      "box_score": 1.0, "area": float(ann["area"]), "bbox_id": ann["id"]})
    return preds


@pytest.fixture(scope="module")
def val_ann(coco_mini: Path) -> Path:
    return coco_mini / "annotations" / "person_keypoints_val2017.json"


def test_ground_truth_as_predictions_scores_ap_one(val_ann: Path) -> None:
    stats = evaluate_coco(gt_as_predictions(val_ann), val_ann)
    assert set(stats) == set(STAT_NAMES)
    assert stats["AP"] == pytest.approx(1.0)
    assert stats["AP50"] == pytest.approx(1.0)
    assert stats["AR"] == pytest.approx(1.0)


def test_perturbed_predictions_score_lower(val_ann: Path) -> None:
    rng = np.random.default_rng(0)
    preds = gt_as_predictions(val_ann)
    for p in preds:
        k = np.asarray(p["keypoints"])
        k[:, :2] += rng.normal(0, 0.08 * np.sqrt(p["area"]), size=k[:, :2].shape)
        p["keypoints"] = k.tolist()
    stats = evaluate_coco(preds, val_ann)
    assert 0.0 < stats["AP"] < 0.9


def test_empty_predictions_give_zero(val_ann: Path) -> None:
    stats = evaluate_coco([], val_ann)
    assert stats == dict.fromkeys(STAT_NAMES, 0.0)


def test_unknown_image_id_is_a_clear_error(val_ann: Path) -> None:
    preds = gt_as_predictions(val_ann)[:1]
    preds[0]["image_id"] = -5
    with pytest.raises(ValueError, match="image ids"):
        evaluate_coco(preds, val_ann)


def test_rescoring_and_nms_follow_mmpose() -> None:
    rng = np.random.default_rng(1)
    k = np.concatenate([rng.uniform(0, 100, (17, 2)), np.full((17, 1), 0.9)], axis=1)
    k[:4, 2] = 0.1  # below vis_thr: ignored by the rescoring mean
    far = k.copy()
    far[:, :2] += 300
    preds = [
        {"image_id": 1, "keypoints": k, "box_score": 0.5, "area": 5000.0},
        {"image_id": 1, "keypoints": k + np.array([0.5, 0.5, 0.0]), "box_score": 0.4, "area": 5000.0},
        {"image_id": 1, "keypoints": far, "box_score": 0.3, "area": 5000.0},
        {"image_id": 2, "keypoints": far * np.array([1, 1, 0]), "box_score": 0.9, "area": 5000.0},
    ]
    out = rescore_and_nms(preds, 17, COCO.sigmas_array())
    assert [r["score"] for r in out] == pytest.approx([0.45, 0.27, 0.0])  # the duplicate is gone
    assert len(out[0]["keypoints"]) == 51


def _mpii_gt(tmp_path: Path, n: int = 6) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    joints = rng.uniform(50, 400, (n, 16, 2))
    vis = np.ones((n, 16))
    vis[0, 3] = 0
    heads = np.zeros((n, 2, 2))
    heads[:, 0] = joints[:, 9] - [10, 10]
    heads[:, 1] = joints[:, 9] + [20, 30]  # diagonal 50 -> head size 30
    path = tmp_path / "gt.json"
    save_mpii_gt(path, joints, vis, heads)
    return path, joints, vis, heads


def test_pckh_perfect_and_thresholds(tmp_path: Path) -> None:
    path, joints, _, _ = _mpii_gt(tmp_path)
    table = evaluate_mpii(joints, path)
    assert list(table) == ["Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "PCKh", "PCKh@0.1"]
    assert all(v == pytest.approx(100.0) for v in table.values())
    # shift everything by 14 px (< 0.5 * 30) -> still correct at 0.5, wrong at 0.11
    t2 = evaluate_mpii(joints + np.array([14.0, 0.0]), path)
    assert t2["PCKh"] == pytest.approx(100.0) and t2["PCKh@0.1"] == pytest.approx(0.0)
    t3 = evaluate_mpii(joints + np.array([16.0, 0.0]), path)
    assert t3["PCKh"] == pytest.approx(0.0)


def test_pckh_masks_pelvis_thorax_and_weights_by_count(tmp_path: Path) -> None:
    path, joints, vis, _ = _mpii_gt(tmp_path)
    preds = joints.copy()
    preds[:, 6:8] += 1000  # pelvis and thorax wrong: not scored
    assert evaluate_mpii(preds, path)["PCKh"] == pytest.approx(100.0)
    preds = joints.copy()
    preds[1, 3] += 1000  # one of 5 visible left hips wrong (person 0's is missing)
    table = evaluate_mpii(preds, path)
    assert table["Hip"] == pytest.approx(0.5 * (80.0 + 100.0))
    total = vis[:, [i for i in range(16) if i not in (6, 7)]].sum()
    assert table["PCKh"] == pytest.approx(100.0 * (total - 1) / total)
    with pytest.raises(ValueError, match="predictions for"):
        evaluate_mpii(joints[:2], path)
