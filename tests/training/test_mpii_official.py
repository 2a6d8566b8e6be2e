"""MPII's official protocol: ``mpii_gt_val.mat`` read with scipy and scored as mmpose 0.16 does.

The expected numbers are counted by hand below (which joints fall inside 0.5 / 0.11 of the head
size), not computed by the scorer's own formula: the count-weighted mean over the 14 scored
joints is simply correct visible joints / visible joints, pelvis and thorax left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from ditepose.training.mpii_eval import MPII_JOINT_CODES, evaluate_mpii, load_mpii_gt
from tests.training.conftest import TINY

N = 4  # people
HEADBOX = np.array([30.0, 40.0])  # headbox diagonal 50 px -> head size 0.6 * 50 = 30 px
RANK, RKNE, LKNE, PELV, THOR, HEAD = 0, 1, 4, 6, 7, 9

# Distance in pixels of each prediction from its ground truth, [joint, person]; 0 elsewhere.
# At 0.5 a joint is correct within 15 px; at mmpose's "PCKh@0.1" (its sweep row 11 = 0.11) within 3.3 px.
DIST = np.zeros((16, N))
DIST[RANK] = [0.0, 20.0, 50.0, 50.0]   # persons 2, 3: missing (their far predictions must not count)
DIST[RKNE] = [14.0, 16.0, 2.0, 3.15]   # 3.15 px = 0.105 head: inside mmpose's 0.11, outside a true 0.10
DIST[LKNE] = [3.45, 0.0, 0.0, 0.0]     # 0.115 head: wrong at 0.11, right at 0.5
DIST[HEAD] = [3.2, 14.9, 15.5, 100.0]  # person 3's head is missing
DIST[PELV] = 100.0                     # pelvis and thorax all wrong: not in the mean
DIST[THOR] = 100.0
MISSING = np.zeros((16, N))
MISSING[RANK, 2:] = 1
MISSING[HEAD, 3] = 1


def _official_mat(path: Path) -> tuple[Path, np.ndarray]:
    """The layout of mmpose's mpii_gt_val.mat; returns it and the 0-based predictions [N, 16, 2]."""
    rng = np.random.default_rng(7)
    pos_gt = rng.uniform(60, 300, (16, 2, N)).round(1)  # 1-based (MATLAB) pixels
    head_top_left = rng.uniform(20, 200, (2, N))
    headboxes = np.stack([head_top_left, head_top_left + HEADBOX[:, None]])  # [2 corners, xy, N]
    names = np.empty((1, 16), dtype=object)  # a 1x16 cell array of strings, as in the official file
    names[0, :] = MPII_JOINT_CODES
    savemat(str(path), {"dataset_joints": names, "jnt_missing": MISSING.astype(np.uint8),
                        "pos_gt_src": pos_gt, "headboxes_src": headboxes})
    direction = np.array([0.6, 0.8])  # a unit vector: the error is exactly DIST
    preds0 = np.transpose(pos_gt, (2, 0, 1)) - 1.0 + DIST.T[..., None] * direction
    return path, preds0


def test_official_mat_layout_scores_as_counted_by_hand(tmp_path: Path) -> None:
    path, preds = _official_mat(tmp_path / "mpii_gt_val.mat")
    gt = load_mpii_gt(path)
    assert gt["dataset_joints"] == list(MPII_JOINT_CODES) and gt["pos_gt_src"].shape == (16, 2, N)
    table = evaluate_mpii(preds, path)
    assert list(table) == ["Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "PCKh", "PCKh@0.1"]
    assert table["Head"] == pytest.approx(100 * 2 / 3)            # 3.2 and 14.9 of 3 visible
    assert table["Knee"] == pytest.approx(0.5 * (100 + 75))       # lkne 4/4, rkne 3/4 (16 px wrong)
    assert table["Ankle"] == pytest.approx(0.5 * (100 + 50))      # lank 4/4, rank 1/2 visible
    for part in ("Shoulder", "Elbow", "Wrist", "Hip"):
        assert table[part] == pytest.approx(100.0)
    # 14 scored joints x 4 people - 3 missing = 53 visible; wrong at 0.5: rank 20, rkne 16, head 15.5
    assert table["PCKh"] == pytest.approx(100 * 50 / 53)
    # wrong at 0.11: rank 20, rkne 14 and 16, lkne 3.45, head 14.9 and 15.5 (rkne 3.15 is inside)
    assert table["PCKh@0.1"] == pytest.approx(100 * 47 / 53, abs=1e-4)  # mmpose keeps the sweep in float32


def test_pelvis_and_thorax_never_enter_the_mean(tmp_path: Path) -> None:
    path, preds = _official_mat(tmp_path / "mpii_gt_val.mat")
    wrong = evaluate_mpii(preds, path)
    assert wrong["PCKh"] != pytest.approx(100 * 50 / 61)  # what counting their 8 wrong joints would give
    fixed = preds.copy()
    fixed[:, [PELV, THOR]] -= DIST[[PELV, THOR]].T[..., None] * np.array([0.6, 0.8])  # now exact
    right = evaluate_mpii(fixed, path)
    assert right["PCKh"] == pytest.approx(wrong["PCKh"]) and right["PCKh@0.1"] == pytest.approx(wrong["PCKh@0.1"])
    # a scored joint does move it: person 1's right ankle put right
    fixed[1, RANK] -= DIST[RANK, 1] * np.array([0.6, 0.8])
    assert evaluate_mpii(fixed, path)["PCKh"] == pytest.approx(100 * 51 / 53)


def test_mat_and_json_of_the_same_truth_agree_and_bad_files_are_named(tmp_path: Path) -> None:
    from ditepose.training.mpii_eval import save_mpii_gt

    path, preds = _official_mat(tmp_path / "mpii_gt_val.mat")
    gt = load_mpii_gt(path)
    save_mpii_gt(tmp_path / "gt.json", np.transpose(gt["pos_gt_src"], (2, 0, 1)) - 1.0, (1 - gt["jnt_missing"]).T,
                 np.transpose(gt["headboxes_src"], (2, 0, 1)))
    assert evaluate_mpii(preds, tmp_path / "gt.json") == pytest.approx(evaluate_mpii(preds, path))
    (tmp_path / "junk.mat").write_text("not a mat file")
    with pytest.raises(ValueError, match=r"junk\.mat"):
        load_mpii_gt(tmp_path / "junk.mat")
    savemat(str(tmp_path / "partial.mat"), {"jnt_missing": MISSING})
    with pytest.raises(ValueError, match="lacks"):
        load_mpii_gt(tmp_path / "partial.mat")
    names = np.empty((1, 16), dtype=object)
    names[0, :] = [*MPII_JOINT_CODES[:-1], "tail"]
    savemat(str(tmp_path / "names.mat"), {"dataset_joints": names, "jnt_missing": MISSING,
                                          "pos_gt_src": gt["pos_gt_src"], "headboxes_src": gt["headboxes_src"]})
    with pytest.raises(ValueError, match="lwri"):
        load_mpii_gt(tmp_path / "names.mat")


def _json_gt_as_official_mat(json_gt: Path, out: Path) -> Path:
    raw = json.loads(json_gt.read_text())
    names = np.empty((1, 16), dtype=object)
    names[0, :] = raw["dataset_joints"]
    savemat(str(out), {"dataset_joints": names, "jnt_missing": np.array(raw["jnt_missing"], np.uint8),
                       "pos_gt_src": np.array(raw["pos_gt_src"]), "headboxes_src": np.array(raw["headboxes_src"])})
    return out


@pytest.fixture
def mpii_set(tmp_path: Path) -> tuple[Path, Path]:
    """A synthetic MPII val split whose ground truth exists only as the official .mat, and a 16-joint checkpoint."""
    from ditepose import model as models
    from ditepose.training.synth import synthesize

    synthesize("mpii", tmp_path / "data", 3, seed=11, split="val")
    ann_dir = tmp_path / "data" / "annotations"
    _json_gt_as_official_mat(ann_dir / "mpii_gt_val.json", ann_dir / "mpii_gt_val.mat")
    (ann_dir / "mpii_gt_val.json").rename(tmp_path / "mpii_gt_val.json")  # kept aside for the comparison
    net = models.build_model("dite_hrnet_18", num_joints=16, **TINY)
    ckpt = tmp_path / "mpii.pth"
    models.save_checkpoint(ckpt, net, models.CheckpointMeta("dite_hrnet_18", "mpii", 16, input_size=(64, 64),
                                                            overrides=TINY))
    return tmp_path, ckpt


def test_ditepose_evaluate_scores_mpii_through_the_official_mat(mpii_set: tuple[Path, Path],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from ditepose.cli import main

    root, ckpt = mpii_set
    assert main(["evaluate", str(ckpt), "--data", str(root / "data"), "--split", "val", "--device", "cpu"]) == 0
    from_mat = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"]
    assert main(["evaluate", str(ckpt), "--data", str(root / "data"), "--split", "val", "--device", "cpu",
                 "--gt", str(root / "mpii_gt_val.json")]) == 0
    from_json = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"]
    assert list(from_mat) == ["Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "PCKh", "PCKh@0.1"]
    assert all(np.isfinite(v) for v in from_mat.values())
    assert from_mat == pytest.approx(from_json)


def test_mpii_dataset_spec_with_a_mat_gt_file_is_what_jobs_score(mpii_set: tuple[Path, Path]) -> None:
    """A catalogue entry ``{"format": "mpii", "gt_file": "...mat"}`` goes to the same evaluation_set/score the jobs call."""
    from ditepose.model import load_pose_model
    from ditepose.model.pipeline import module_infer
    from ditepose.service.core.settings import DatasetSpec
    from ditepose.training.boxes import BoxSource, evaluation_set
    from ditepose.training.evaluate import pipeline_for, predict, score

    root, ckpt = mpii_set
    ann_dir = root / "data" / "annotations"
    spec = DatasetSpec.model_validate({"format": "mpii", "ann_file": str(ann_dir / "mpii_val.json"),
                                       "img_dir": str(root / "data" / "images"),
                                       "gt_file": str(ann_dir / "mpii_gt_val.mat")})
    net, meta = load_pose_model(ckpt)
    eval_set = evaluation_set(spec.format, spec.ann_file, spec.img_dir, meta.input_size, BoxSource("gt"),
                              gt_file=spec.gt_file)
    assert eval_set.gt_file == ann_dir / "mpii_gt_val.mat"
    preds = predict(module_infer(net), eval_set.dataset, pipeline_for(eval_set.dataset), batch_size=8)
    table = score(eval_set.dataset, preds, eval_set.gt_file)
    keypoints = np.stack([p["keypoints"][:, :2] for p in preds])
    assert table == pytest.approx(evaluate_mpii(keypoints, root / "mpii_gt_val.json"))
