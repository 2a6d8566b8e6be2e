"""Which person boxes an evaluation crops (training/boxes.py), on real coco-mini images.

The pose model is the shipped demo checkpoint: it has a non-zero AP only on the coco-mini train
people it learned, so GT-vs-detected differences are measured there; the detector's own report
is checked on val. Everything is kept to a few images (max_images): a 256x192 forward pass costs
~30 ms here and NanoDet ~60-200 ms per image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ditepose.model import default_checkpoint_path
from ditepose.training.boxes import BoxSource, box_label, box_record, evaluation_set
from tests.training.conftest import TINY

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(demo_checkpoint: Path) -> tuple[Any, Any]:
    from ditepose.model import load_pose_model

    return load_pose_model(demo_checkpoint)


def _ap(demo: tuple[Any, Any], dataset: Any) -> dict[str, float]:
    from ditepose.model.pipeline import module_infer
    from ditepose.training.evaluate import pipeline_for, predict, score

    module, _ = demo
    preds = predict(module_infer(module), dataset, pipeline_for(dataset, flip_test=False), batch_size=16)
    return score(dataset, preds)


def _first_person_images(ann_file: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` images (by id) holding a non-crowd person with labelled joints, from the json itself."""
    ann = json.loads(ann_file.read_text())
    ids = sorted({a["image_id"] for a in ann["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"]})[:n]
    by_id = {i["id"]: i for i in ann["images"]}
    return [by_id[i] for i in ids]


def test_detector_boxes_are_the_detectors_own_and_change_the_ap(coco_mini: Path, demo: tuple[Any, Any],
                                                                 nanodet: Any,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from ditepose.cli import main
    from ditepose.training.datasets import read_rgb

    def evaluate(*args: str) -> dict[str, Any]:
        assert main(["evaluate", str(default_checkpoint_path()), "--data", str(coco_mini), "--split", "train",
                     "--max-images", "4", "--no-flip", "--device", "cpu", *args]) == 0
        return json.loads(capsys.readouterr().out)

    gt, det = evaluate(), evaluate("--boxes", "detector")
    assert gt["boxes"] == "gt" and gt["box_source"] == {"source": "gt"} and "detector_report" not in gt
    assert det["boxes"] == "detector:nanodet"
    assert det["box_source"] == {"source": "detector", "detector": "nanodet", "score_thr": nanodet.score_thr}
    # The persons evaluated are exactly NanoDet's boxes on those 4 images, not the annotated ones.
    images = _first_person_images(coco_mini / "annotations" / "person_keypoints_train2017.json", 4)
    found = nanodet.detect_batch([read_rgb(coco_mini / "train2017" / i["file_name"]) for i in images])
    detections = sum(len(scores) for _, scores in found)
    assert det["samples"] == detections == det["detector_report"]["detections"]
    assert det["detector_report"]["images"] == 4 and det["max_images"] == 4
    assert gt["samples"] == sum(1 for a in json.loads((coco_mini / "annotations" / "person_keypoints_train2017.json")
                                                      .read_text())["annotations"]
                                if a["image_id"] in {i["id"] for i in images} and a["num_keypoints"] > 0
                                and not a["iscrowd"])
    assert gt["metrics"]["AP"] > 0.0  # the demo model knows these people
    assert det["metrics"]["AP"] != pytest.approx(gt["metrics"]["AP"], abs=1e-6)


def test_detector_records_carry_the_detected_boxes_and_scores_at_the_threshold(coco_mini: Path,
                                                                                nanodet: Any) -> None:
    from ditepose.training.datasets import read_rgb

    ann, img_dir = coco_mini / "annotations" / "person_keypoints_val2017.json", coco_mini / "val2017"
    default = evaluation_set("coco", ann, img_dir, (192, 256), BoxSource("detector"), max_images=3)
    strict = evaluation_set("coco", ann, img_dir, (192, 256), BoxSource("detector", score_thr=0.5), max_images=3)
    images = _first_person_images(ann, 3)
    assert default.dataset.eval_image_ids == [i["id"] for i in images]
    found = nanodet.detect_batch([read_rgb(img_dir / i["file_name"]) for i in images])
    expected = [(i["id"], box, score) for i, (boxes, scores) in zip(images, found, strict=True)
                for box, score in zip(boxes, scores, strict=True)]
    got = [(r["image_id"], r["bbox"], r["bbox_score"]) for r in default.dataset.records]
    assert len(got) == len(expected) > 0
    for (gid, gbox, gscore), (eid, ebox, escore) in zip(got, expected, strict=True):
        assert gid == eid and gscore == pytest.approx(float(escore), abs=1e-6)
        np.testing.assert_allclose(gbox, ebox, atol=1e-3)
    assert all(r["bbox_score"] > 0.3 for r in default.dataset.records)
    # A higher threshold keeps exactly the boxes above it (NMS only ever removes lower-scoring boxes).
    above = [(i, s) for i, _, s in expected if s > 0.5]
    assert [(r["image_id"], pytest.approx(r["bbox_score"], abs=1e-6)) for r in strict.dataset.records] == above
    assert strict.box_source == {"source": "detector", "detector": "nanodet", "score_thr": 0.5}
    assert strict.detector_report["detections"] == len(above)


def test_detections_file_of_exact_gt_boxes_scores_as_gt_and_jitter_changes_it(coco_mini: Path, tmp_path: Path,
                                                                              demo: tuple[Any, Any]) -> None:
    ann, img_dir = coco_mini / "annotations" / "person_keypoints_train2017.json", coco_mini / "train2017"
    gt = evaluation_set("coco", ann, img_dir, (192, 256), BoxSource("gt"), max_images=5)
    exact = [{"image_id": r["image_id"], "bbox": r["bbox"], "score": 1.0, "category_id": 1} for r in gt.dataset.records]
    rng = np.random.default_rng(0)
    jittered = [dict(d, bbox=(np.asarray(d["bbox"]) + rng.normal(0, 0.15, 4) * np.tile(d["bbox"][2:], 2)).tolist(),
                     score=float(rng.uniform(0.5, 1.0))) for d in exact]
    (tmp_path / "exact.json").write_text(json.dumps(exact))
    (tmp_path / "jitter.json").write_text(json.dumps(jittered))
    same = evaluation_set("coco", ann, img_dir, (192, 256), BoxSource.parse(det_file=tmp_path / "exact.json"),
                          max_images=5)
    moved = evaluation_set("coco", ann, img_dir, (192, 256), BoxSource("detections", tmp_path / "jitter.json"),
                           max_images=5)
    assert same.box_source == {"source": "detections", "file": str(tmp_path / "exact.json"), "det_bbox_thr": 0.0}
    assert same.describe()["boxes"] == f"detections:{tmp_path / 'exact.json'}"
    assert len(same.dataset) == len(moved.dataset) == len(gt.dataset) > 0
    ap_gt, ap_same, ap_moved = _ap(demo, gt.dataset), _ap(demo, same.dataset), _ap(demo, moved.dataset)
    assert ap_gt["AP"] > 0.0
    assert ap_same == pytest.approx(ap_gt, abs=1e-12)
    assert ap_moved["AP"] != pytest.approx(ap_gt["AP"], abs=1e-6)


@pytest.mark.slow
def test_detector_report_recall_is_the_bench_definition(coco_mini: Path, nanodet: Any) -> None:
    """On all of coco-mini val: the library's report, a direct count from the annotations, and the
    committed bench/results/detector.json agree."""
    from ditepose.training.datasets import CocoKeypointDataset
    from ditepose.training.detection_eval import detection_report, iou_xywh, run_detector

    ann_file, img_dir = coco_mini / "annotations" / "person_keypoints_val2017.json", coco_mini / "val2017"
    ann = json.loads(ann_file.read_text())
    coco = CocoKeypointDataset(ann_file, img_dir, train=False).coco
    run = run_detector(nanodet, [(i["id"], img_dir / i["file_name"]) for i in ann["images"]], batch_size=1)
    report = detection_report(coco, run)
    targets = [a for a in ann["annotations"] if not a["iscrowd"] and a["num_keypoints"] >= 5]
    found = sum(any(iou_xywh(a["bbox"], b) >= 0.5 for b in run.by_image[a["image_id"]][0]) for a in targets)
    assert report["images"] == len(ann["images"]) and report["targets"] == len(targets)
    assert report["found"] == found and report["recall_at_iou50"] == pytest.approx(found / len(targets))
    bench = {r["detector"]: r for r in json.loads((REPO_ROOT / "bench" / "results" / "detector.json").read_text())
             ["rows"]}["nanodet"]
    assert (report["targets"], report["found"], report["false_positives"]) == \
        (bench["targets"], bench["found"], bench["false_positives"])
    assert round(report["bbox_ap"], 3) == bench["bbox_ap"] and round(report["bbox_ap50"], 3) == bench["bbox_ap50"]
    assert report["ms_per_image_median"] > 0 and report["score_thr"] == nanodet.score_thr


def test_box_options_are_checked_with_clear_errors(coco_mini: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a detections file"):
        BoxSource("detections")
    with pytest.raises(ValueError, match="unknown detector 'nope'"):
        BoxSource.parse("detector", detector="nope")
    with pytest.raises(ValueError, match="boxes must be one of"):
        BoxSource("boxes-from-nowhere")
    with pytest.raises(ValueError, match="for boxes 'detector', not 'gt'"):
        BoxSource.parse("gt", detector="hog")
    with pytest.raises(ValueError, match="for boxes 'detections', not 'detector'"):
        BoxSource.parse("detector", det_file="x.json")
    with pytest.raises(ValueError, match=r"MPII.*boxes must be 'gt'"):
        evaluation_set("mpii", tmp_path / "a.json", tmp_path, (256, 256), BoxSource("detector"))
    assert BoxSource.parse().record() == {"source": "gt"}
    # the older one-string labels still read as records, and back
    for label in ("gt", "detections:/d/x.json", "detector:nanodet"):
        assert box_label(box_record(label)) == label
    assert box_record({"source": "detector", "detector": "hog", "score_thr": 0.3})["detector"] == "hog"


def _mpii_checkpoint(tmp_path: Path) -> Path:
    from ditepose import model as models

    net = models.build_model("dite_hrnet_18", num_joints=16, **TINY)
    path = tmp_path / "mpii.pth"
    models.save_checkpoint(path, net, models.CheckpointMeta("dite_hrnet_18", "mpii", 16, input_size=(64, 64),
                                                            overrides=TINY))
    return path


def test_evaluate_cli_rejects_bad_box_options(coco_mini: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from ditepose.cli import main

    demo_ckpt = default_checkpoint_path() or tmp_path / "absent.pth"
    cases = [
        (["--boxes", "detections"], "needs a detections file"),
        (["--boxes", "detector", "--detector", "nope"], "unknown detector 'nope'"),
        (["--boxes", "gt", "--det-score-thr", "0.5"], "not 'gt'"),
        (["--det-file", str(tmp_path / "missing.json")], "detection file not found"),
    ]
    for args, message in cases:
        assert main(["evaluate", str(demo_ckpt), "--data", str(coco_mini), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("ditepose evaluate: error:") and message in err, (args, err)
    mpii = _mpii_checkpoint(tmp_path)
    assert main(["evaluate", str(mpii), "--ann", str(tmp_path / "mpii_val.json"), "--img-dir", str(tmp_path),
                 "--boxes", "detector"]) == 2
    assert "MPII" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # argparse: a usage error, exit 2
        main(["evaluate", str(demo_ckpt), "--boxes", "sideways"])
    assert usage.value.code == 2 and "invalid choice: 'sideways'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "dite_hrnet_18", "--data", str(coco_mini), "--work-dir", str(tmp_path), "--test-boxes", "nope"])
    capsys.readouterr()
    # an explicit detections file must exist before training starts, not after the last epoch
    assert main(["train", "dite_hrnet_18", "--data", str(coco_mini), "--work-dir", str(tmp_path / "w"),
                 "--det-file", str(tmp_path / "missing.json"), "--quiet"]) == 2
    assert "missing.json not found" in capsys.readouterr().err
    assert not (tmp_path / "w" / "latest.pt").exists()


@pytest.mark.slow
def test_train_tests_on_detector_boxes_and_validates_on_gt(coco_mini: Path, tmp_path: Path, nanodet: Any) -> None:
    """Issue 16: periodic validation stays on GT boxes; --test-boxes detector scores the final model on
    NanoDet's boxes over coco-mini val, and every record of it says so."""
    from ditepose.model import load_pose_model
    from ditepose.training.config import get_config
    from ditepose.training.trainer import Trainer

    cfg = get_config("dite_hrnet_18_coco_256x192").replace(
        epochs=1, global_batch=4, input_size=(64, 64), workers=0, max_people=4, eval_every=1, warmup_iters=1,
        checkpoint_every=0, model_overrides=TINY, test_boxes="detector", flip_test=False)
    summary = Trainer(cfg, coco_mini, tmp_path / "work", device="cpu", progress=False).fit()
    assert summary["validation"]["boxes"] == "gt" and summary["best"]["boxes"] == "gt"
    test = summary["test"]
    assert test["boxes"] == "detector:nanodet" and "note" not in test
    assert test["box_source"] == {"source": "detector", "detector": "nanodet", "score_thr": nanodet.score_thr}
    report = test["detector_report"]
    assert report["images"] == 79 and report["targets"] == 57 and set(test["metrics"]) >= {"AP", "AR"}
    rows = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["box_source"] for r in rows if r["kind"] == "test"] == [test["box_source"]]
    _, meta = load_pose_model(tmp_path / "work" / "final.pt")
    assert meta.extra["box_source"] == test["box_source"] and meta.extra["boxes"] == "detector:nanodet"
    _, best = load_pose_model(tmp_path / "work" / "best.pt")
    assert best.extra["box_source"] == {"source": "gt"} and best.extra["boxes"] == "gt"
