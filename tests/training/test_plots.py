"""Plots: the files exist, are real PNGs with content, and the readers/breakdowns compute the right numbers."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditepose.model.keypoints import COCO
from ditepose.training.eval_breakdown import coco_breakdown, write_evaluation_plots
from ditepose.training.plots import (
    plot_loss,
    plot_metric_curves,
    plot_oks_histogram,
    plot_per_joint,
    plot_training_curves,
    read_metrics_log,
)

# The trainer's MetricsLogger.CSV_FIELDS (training branch): train rows have loss, eval rows metrics.
CSV_HEADER = "kind,epoch,iter,loss,lr,seconds,AP,AP50,AR,PCKh,PCKh@0.1"


def _assert_png(path: Path, min_bytes: int = 8_000) -> np.ndarray:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > min_bytes, f"{path} is only {path.stat().st_size} bytes"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels.std() > 10, "the image is (almost) blank"
    return pixels


def _trainer_csv(path: Path, epochs: int = 6, iters_per_epoch: int = 5) -> Path:
    lines = [CSV_HEADER]
    it = 0
    for epoch in range(1, epochs + 1):
        for _ in range(iters_per_epoch):
            it += 1
            lines.append(f"train,{epoch},{it},{0.002 / it ** 0.5:.6f},0.001,0.5,,,,,")
        lines.append(f"eval,{epoch},{it},,,,{0.1 * epoch:.3f},{0.12 * epoch:.3f},{0.11 * epoch:.3f},,")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_the_trainer_csv(tmp_path: Path) -> None:
    rows = read_metrics_log(_trainer_csv(tmp_path / "metrics.csv"))
    assert len(rows) == 36
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(train) == 30 and len(evals) == 6
    assert train[0] == {"kind": "train", "epoch": 1.0, "iter": 1.0, "loss": 0.002, "lr": 0.001, "seconds": 0.5}
    assert evals[-1]["AP"] == pytest.approx(0.6) and "PCKh" not in evals[-1] and "loss" not in evals[-1]


def test_reads_json_lines_with_aliases_and_a_torn_last_line(tmp_path: Path) -> None:
    log = tmp_path / "work"
    log.mkdir()
    records = [{"Step": i, "train_loss": 1.0 / i, "Epoch": 1 + i // 10} for i in range(1, 21)]
    records += [{"epoch": 1, "pckh": 71.5, "PCKh@0.1": 30.0}, {"epoch": 2, "pckh": float("nan")}]
    text = "\n".join(json.dumps(r) for r in records) + '\n{"step": 21, "train_lo'
    (log / "metrics.jsonl").write_text(text)
    rows = read_metrics_log(log)  # a work dir: finds metrics.jsonl
    assert len(rows) == 22
    assert rows[0] == {"iter": 1.0, "loss": 1.0, "epoch": 1.0}
    assert rows[20] == {"epoch": 1.0, "PCKh": 71.5, "PCKh@0.1": 30.0}
    assert rows[21] == {"epoch": 2.0}  # NaN is dropped, not plotted


def test_training_curves_from_a_work_dir(tmp_path: Path) -> None:
    _trainer_csv(tmp_path / "metrics.csv")
    written = plot_training_curves(tmp_path, tmp_path / "plots", smooth=5)
    assert [p.name for p in written] == ["loss.png", "metrics.png"]
    for path in written:
        _assert_png(path)


def test_curves_need_something_to_plot(tmp_path: Path) -> None:
    rows = [{"epoch": 1.0, "lr": 0.1}]
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_training_curves(rows, tmp_path)
    with pytest.raises(ValueError, match="no 'loss'"):
        plot_loss(rows, tmp_path / "loss.png")
    with pytest.raises(ValueError, match="none of"):
        plot_metric_curves(rows, tmp_path / "m.png")
    with pytest.raises(FileNotFoundError):
        read_metrics_log(tmp_path / "missing")


def test_mpii_metric_curve(tmp_path: Path) -> None:
    rows = [{"epoch": float(e), "PCKh": 50.0 + 5 * e, "PCKh@0.1": 20.0 + 2 * e} for e in range(1, 8)]
    _assert_png(plot_metric_curves(rows, tmp_path / "pckh.png"))


def test_undefined_coco_values_are_not_points(tmp_path: Path) -> None:
    """pycocotools reports -1 where it has no ground truth; a log of only -1 has nothing to plot."""
    rows = [{"epoch": 1.0, "AP75": -1.0}, {"epoch": 2.0, "AP75": -1.0}]
    with pytest.raises(ValueError, match="none of"):
        plot_metric_curves(rows, tmp_path / "m.png")
    rows.append({"epoch": 3.0, "AP": 0.25})
    _assert_png(plot_metric_curves(rows, tmp_path / "m.png"), min_bytes=5_000)


def test_per_joint_bars(tmp_path: Path) -> None:
    coco = {name: 0.3 + 0.04 * i for i, name in enumerate(COCO.joint_names)}
    pixels = _assert_png(plot_per_joint(coco, tmp_path / "coco.png"))
    # Left joints are drawn in the warm and right joints in the cool colour of model/draw.py.
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7].tolist()}
    assert (255, 160, 40) in colours and (40, 160, 255) in colours
    mpii = [("Head", 96.3), ("Shoulder", 95.0), ("Elbow", 88.1), ("Wrist", 82.4), ("Hip", 87.0)]
    _assert_png(plot_per_joint(mpii, tmp_path / "mpii.png", title="PCKh"))
    with pytest.raises(ValueError, match="no per-joint"):
        plot_per_joint({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="finite"):
        plot_per_joint({"nose": float("nan")}, tmp_path / "x.png")


def test_oks_histogram(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.beta(5, 2, 300), [np.nan, 0.0, 1.0]])
    _assert_png(plot_oks_histogram(values, tmp_path / "nested" / "oks.png"))
    with pytest.raises(ValueError, match="no finite"):
        plot_oks_histogram([np.nan], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plot_oks_histogram([0.5, 1.7], tmp_path / "x.png")


@pytest.fixture(scope="module")
def coco_val(coco_mini: Path):
    from pycocotools.coco import COCO as CocoApi

    with contextlib.redirect_stdout(io.StringIO()):
        return CocoApi(str(coco_mini / "annotations" / "person_keypoints_val2017.json"))


def _gt_predictions(coco) -> list[dict]:
    preds = []
    for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
        if ann.get("num_keypoints", 0) > 0:
            kpts = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
            preds.append({"image_id": ann["image_id"], "keypoints": kpts, "area": ann["area"]})
    return preds


def test_breakdown_of_perfect_and_degraded_predictions(coco_val) -> None:
    perfect = _gt_predictions(coco_val)
    exact = coco_breakdown(perfect, coco_val)
    assert len(exact.oks) == len(perfect) == 68  # coco-mini val: 68 people with keypoints
    np.testing.assert_allclose(exact.oks, 1.0)
    assert exact.per_joint == dict.fromkeys(COCO.joint_names, 1.0)

    # Move every left wrist far away; drop the predictions of one image entirely.
    moved = [dict(p, keypoints=p["keypoints"].copy()) for p in perfect]
    for p in moved:
        p["keypoints"][9, :2] += 500
    dropped_image = moved[0]["image_id"]
    kept = [p for p in moved if p["image_id"] != dropped_image]
    result = coco_breakdown(kept, coco_val)
    missing = len(moved) - len(kept)
    with_wrist = sum(1 for p in kept if p["keypoints"][9, 2] > 0)
    assert (result.oks == 0).sum() == missing
    assert ((result.oks > 0) & (result.oks < 1)).sum() == with_wrist  # only people with a labelled left wrist
    assert (result.oks == 1).sum() == len(kept) - with_wrist
    labelled_wrists = result.joint_counts["left_wrist"]
    assert result.per_joint["left_wrist"] == 0.0 and labelled_wrists > 10
    # Other joints are exact except where the dropped image's people had them labelled.
    noses = [p["keypoints"][0, 2] > 0 for p in perfect]
    noses_kept = [p["keypoints"][0, 2] > 0 for p in perfect if p["image_id"] != dropped_image]
    assert result.per_joint["nose"] == pytest.approx(sum(noses_kept) / sum(noses))


def test_write_evaluation_plots(tmp_path: Path, coco_val, coco_mini: Path) -> None:
    preds = _gt_predictions(coco_val)
    rng = np.random.default_rng(1)
    for p in preds:
        p["keypoints"] = p["keypoints"] + np.concatenate([rng.normal(0, 6, (17, 2)), np.zeros((17, 1))], 1)
    ann_file = coco_mini / "annotations" / "person_keypoints_val2017.json"
    written = write_evaluation_plots(tmp_path / "coco", "coco", preds, {"AP": 0.5}, coco_gt=ann_file)
    assert [p.name for p in written] == ["per_joint.png", "oks_hist.png"]
    for path in written:
        _assert_png(path)
    mpii = {"Head": 96.0, "Shoulder": 94.5, "Elbow": 87.0, "Wrist": 81.0, "Hip": 86.5, "Knee": 82.0,
            "Ankle": 78.0, "PCKh": 87.4, "PCKh@0.1": 33.0}
    (path,) = write_evaluation_plots(tmp_path / "mpii", "mpii", [], mpii)
    _assert_png(path)
    with pytest.raises(ValueError, match="ground truth"):
        write_evaluation_plots(tmp_path, "coco", preds, {})
