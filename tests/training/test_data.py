"""Synthetic data, datasets and the mmpose train pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ditepose.model.keypoints import COCO, MPII
from ditepose.training.augment import AugmentConfig, apply_pipeline, fliplr_joints, half_body_box
from ditepose.training.datasets import CocoKeypointDataset, MpiiKeypointDataset
from ditepose.training.synth import synthesize


@pytest.fixture(scope="module")
def synth_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_coco")
    synthesize("coco", out, 6, seed=3)
    return out


def test_synth_is_deterministic_and_valid(tmp_path: Path, synth_coco: Path) -> None:
    synthesize("coco", tmp_path, 6, seed=3)
    a = (synth_coco / "annotations" / "person_keypoints_train.json").read_text()
    b = (tmp_path / "annotations" / "person_keypoints_train.json").read_text()
    assert a == b
    assert (synth_coco / "train" / "000000.jpg").read_bytes() == (tmp_path / "train" / "000000.jpg").read_bytes()
    data = json.loads(a)
    assert len(data["images"]) == 6 and data["annotations"]
    for ann in data["annotations"]:
        k = np.asarray(ann["keypoints"]).reshape(17, 3)
        assert ann["num_keypoints"] == int((k[:, 2] > 0).sum())
        x, _y, w, _h = ann["bbox"]
        inside = k[:, 2] > 0
        assert np.all(k[inside, 0] >= x - 5) and np.all(k[inside, 0] <= x + w + 5)
    with pytest.raises(ValueError, match="unknown synthetic format"):
        synthesize("voc", tmp_path, 1)


def test_synth_mpii_round_trips_through_dataset(tmp_path: Path) -> None:
    ann = synthesize("mpii", tmp_path, 3, seed=5)
    entries = json.loads(ann.read_text())
    gt = json.loads((tmp_path / "annotations" / "mpii_gt_train.json").read_text())
    assert np.asarray(gt["pos_gt_src"]).shape == (16, 2, len(entries))
    ds = MpiiKeypointDataset(ann, tmp_path / "images", train=False)
    rec = ds.records[0]
    np.testing.assert_allclose(rec["joints"], np.asarray(entries[0]["joints"]) - 1, atol=1e-4)
    assert rec["scale"][0] == pytest.approx(entries[0]["scale"] * 1.25)
    assert rec["center"][1] == pytest.approx(entries[0]["center"][1] + 15 * entries[0]["scale"] - 1)
    sample = ds[0]
    assert sample["input"].shape == (3, 256, 256) and sample["target"].shape == (16, 64, 64)


def test_targets_peak_at_the_joints(synth_coco: Path) -> None:
    ds = CocoKeypointDataset(synth_coco / "annotations" / "person_keypoints_train.json", synth_coco / "train",
                             (192, 256), train=False)
    rec, sample = ds.records[0], ds[0]
    assert sample["input"].shape == (3, 256, 192) and sample["target"].shape == (17, 64, 48)
    from ditepose.model.transforms import affine_transform_points, get_affine_transform

    trans = get_affine_transform(rec["center"], rec["scale"], 0, (192, 256))
    for j in range(17):
        if sample["target_weight"][j, 0] == 0:
            continue
        y, x = np.unravel_index(np.argmax(sample["target"][j]), (64, 48))
        expected = affine_transform_points(rec["joints"][j], trans) / 4
        assert abs(x - expected[0]) <= 1 and abs(y - expected[1]) <= 1
        assert sample["target"][j].max() == pytest.approx(1.0)


def test_flip_swaps_left_and_right_joints() -> None:
    joints = np.array([[10.0, 5.0]] * 17, dtype=np.float32)
    joints[5] = [30, 40]  # left shoulder
    joints[6] = [60, 41]  # right shoulder
    vis = np.ones(17, np.float32)
    vis[3] = 0
    fj, fv = fliplr_joints(joints, vis, 100, COCO.flip_pairs)
    np.testing.assert_allclose(fj[5], [100 - 1 - 60, 41])  # new left = mirrored old right
    np.testing.assert_allclose(fj[6], [100 - 1 - 30, 40])
    assert fv[4] == 0 and fv[3] == 1  # visibility swaps with the joint (ears 3 <-> 4)
    np.testing.assert_allclose(fj[4], [0, 0])  # invisible joints are zeroed as in mmpose


def test_flip_in_pipeline_mirrors_image_and_labels() -> None:
    img = np.zeros((64, 80, 3), np.uint8)
    img[:, :20] = 255  # bright stripe on the left
    joints = np.tile(np.array([[40.0, 32.0]], np.float32), (16, 1))
    joints[0] = [10, 32]  # right ankle, inside the stripe
    s = {"img": img, "joints": joints, "visible": np.ones(16, np.float32),
         "center": np.array([39.5, 31.5], np.float32), "scale": np.array([0.4, 0.4], np.float32)}
    cfg = AugmentConfig(flip_prob=1.0, half_body_prob=0.0, scale_factor=0.0, rot_factor=0.0, rot_prob=0.0)
    out = apply_pipeline(s, np.random.default_rng(0), (64, 64), MPII.flip_pairs, MPII.upper_body_ids, cfg)
    assert out["flipped"]
    assert out["input"][0, :, -8:].mean() > out["input"][0, :, :8].mean()  # stripe moved right
    _y, x = np.unravel_index(np.argmax(out["target"][5]), out["target"].shape[1:])  # left ankle now
    assert x > 8  # the former right ankle, mirrored to the right half


def test_half_body_box_covers_the_chosen_half() -> None:
    rng = np.random.default_rng(0)
    joints = np.array([[50 + i, 20 + 10 * i] for i in range(17)], np.float32)
    vis = np.ones(17, np.float32)
    seen = set()
    for _ in range(20):
        center, scale = half_body_box(joints, vis, COCO.upper_body_ids, 0.75, rng)
        half = "upper" if center[1] < joints[11, 1] else "lower"
        seen.add(half)
        ids = COCO.upper_body_ids if half == "upper" else COCO.lower_body_ids
        assert center == pytest.approx(joints[list(ids)].mean(0))
        assert scale[1] * 200 == pytest.approx(np.ptp(joints[list(ids), 1]) * 1.5, rel=1e-4)
    assert seen == {"upper", "lower"}
    assert half_body_box(joints, np.zeros(17), COCO.upper_body_ids, 0.75, rng) is None


def test_train_augmentation_is_a_function_of_seed_epoch_index(synth_coco: Path) -> None:
    ann, img = synth_coco / "annotations" / "person_keypoints_train.json", synth_coco / "train"
    a = CocoKeypointDataset(ann, img, (192, 256), train=True, seed=7)
    b = CocoKeypointDataset(ann, img, (192, 256), train=True, seed=7)
    np.testing.assert_array_equal(a[1]["input"], b[1]["input"])
    b.set_epoch(1)
    assert not np.array_equal(a[1]["input"], b[1]["input"])


def test_coco_mini_loading_and_detection_boxes(coco_mini: Path, tmp_path: Path) -> None:
    ann = coco_mini / "annotations" / "person_keypoints_val2017.json"
    ds = CocoKeypointDataset(ann, coco_mini / "val2017", train=False)
    data = json.loads(ann.read_text())
    with_kpts = [a for a in data["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"]]
    assert len(ds) == len(with_kpts)  # people without keypoints are skipped
    dets = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": s, "category_id": 1}
            for a, s in zip(data["annotations"][:10], np.linspace(0.1, 1.0, 10), strict=True)]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    det_ds = CocoKeypointDataset(ann, coco_mini / "val2017", train=False, use_gt_bbox=False,
                                 det_file=tmp_path / "dets.json", det_score_thr=0.5)
    assert len(det_ds) == sum(1 for d in dets if d["score"] >= 0.5)
    assert det_ds[0]["bbox_score"] >= 0.5
    with pytest.raises(ValueError, match="det_file"):
        CocoKeypointDataset(ann, coco_mini / "val2017", use_gt_bbox=False)


def test_encoded_targets_decode_back_to_high_ap(coco_mini: Path) -> None:
    """Dataset crop -> Gaussian targets -> mmpose decoding -> AP: the training and scoring paths agree."""
    from ditepose.model.codec import decode_heatmaps
    from ditepose.training.coco_eval import evaluate_coco

    ann = coco_mini / "annotations" / "person_keypoints_train2017.json"
    ds = CocoKeypointDataset(ann, coco_mini / "train2017", (192, 256), train=False, max_people=30)
    assert ds.eval_image_ids is not None and len(ds) >= 30
    preds = []
    for i in range(len(ds)):
        s = ds[i]
        coords, scores = decode_heatmaps(s["target"][None], s["center"][None], s["scale"][None], "default")
        kpts = np.concatenate([coords[0], scores[0][:, None]], axis=1)
        preds.append({"image_id": s["image_id"], "keypoints": kpts, "box_score": 1.0, "area": float(s["area"])})
    assert evaluate_coco(preds, ds.coco, img_ids=ds.eval_image_ids)["AP"] > 0.9


def test_render_many_images_labels_stay_consistent() -> None:
    from ditepose.training.synth import render_image

    for seed in range(60):
        rng = np.random.default_rng(seed)
        w, h = int(rng.integers(240, 400)), int(rng.integers(240, 400))
        img, people = render_image(rng, w, h)
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
        for person in people:
            for name, v in person["vis"].items():
                x, y = person["points"][name]
                inside = 0 <= x < w and 0 <= y < h
                assert (v > 0) == inside
            x0, y0, bw, bh = person["bbox"]
            assert x0 >= 0 and y0 >= 0 and x0 + bw <= w and y0 + bh <= h and person["area"] > 0
