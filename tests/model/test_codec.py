"""mmpose 0.16 heatmap codec against goldens produced by mmpose itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ditepose.model.codec import decode_heatmaps, encode_heatmaps, flip_back, flip_test_merge
from ditepose.model.keypoints import COCO
from ditepose.model.transforms import get_affine_transform


@pytest.fixture(scope="module")
def golden(shared_dir: Path) -> dict[str, np.ndarray]:
    with np.load(shared_dir / "fixtures/reference/mmpose_v0_16_postprocess_golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize(
    ("method", "key"), [("argmax", "none"), ("default", "default"), ("dark", "unbiased_k11")]
)
def test_decode_matches_mmpose(golden: dict, method: str, key: str) -> None:
    preds, scores = decode_heatmaps(golden["heatmaps"], golden["center"], golden["scale"], method=method)
    assert preds.shape == (24, 17, 2) and scores.shape == (24, 17)
    np.testing.assert_allclose(preds, golden[f"preds_{key}"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores, golden[f"maxvals_{key}"][..., 0], atol=1e-6, rtol=0)


def test_all_negative_maps_decode_to_minus_one(golden: dict) -> None:
    hm = golden["heatmaps"]
    neg = hm.reshape(24, 17, -1).max(-1) <= 0
    assert neg.any(), "golden set should contain all-negative maps"
    preds, scores = decode_heatmaps(hm, golden["center"], golden["scale"], method="default")
    assert (scores[neg] <= 0).all()
    # -1 in heatmap space, mapped back: x = -1 * s*200/W + c - s*200/2
    s = golden["scale"] * 200
    expected = -1 * s / np.array([48, 64]) + golden["center"] - s / 2
    n_idx, _ = np.nonzero(neg)
    np.testing.assert_allclose(preds[neg], expected[n_idx], atol=1e-4)


def test_unknown_decoder_is_rejected(golden: dict) -> None:
    with pytest.raises(ValueError, match="unknown decoder"):
        decode_heatmaps(golden["heatmaps"][:1], golden["center"][:1], golden["scale"][:1], method="udp")


def test_flip_back_matches_mmpose(golden: dict) -> None:
    out = flip_back(golden["heatmaps"], golden["flip_pairs"])
    np.testing.assert_array_equal(out, golden["flip_back_shift"])


def test_flip_test_merge_shifts_and_averages(golden: dict) -> None:
    hm = golden["heatmaps"][:2]
    flipped = golden["heatmaps"][2:4]
    merged = flip_test_merge(hm, flipped, COCO.flip_pairs, shift=True)
    back = golden["flip_back_shift"][2:4].copy()
    back[..., 1:] = back[..., :-1].copy()
    np.testing.assert_allclose(merged, (hm + back) / 2, atol=1e-7)
    unshifted = flip_test_merge(hm, flipped, COCO.flip_pairs, shift=False)
    np.testing.assert_allclose(unshifted, (hm + golden["flip_back_shift"][2:4]) / 2, atol=1e-7)


def test_affine_transform_matches_mmpose(golden: dict) -> None:
    for case, expected in zip(golden["affine_cases"], golden["affine_mats"], strict=True):
        cx, cy, sx, sy, rot, out_w, out_h, inv = case
        mat = get_affine_transform((cx, cy), (sx, sy), rot, (int(out_w), int(out_h)), inv=bool(inv))
        np.testing.assert_allclose(mat, expected, atol=1e-5, rtol=0)


def test_encode_gaussian_shape_and_weights() -> None:
    joints = np.array([[96.0, 128.0], [-100.0, 10.0], [20.0, 30.0], [191.0, 255.0]])
    target, weight = encode_heatmaps(joints, np.array([1, 1, 0, 2]), (192, 256), (48, 64), sigma=2.0)
    assert target.shape == (4, 64, 48) and target.dtype == np.float32
    np.testing.assert_array_equal(weight, [1, 0, 0, 1])
    assert target[0, 32, 24] == pytest.approx(1.0)
    assert target[0, 32, 26] == pytest.approx(np.exp(-4 / 8))
    assert target[0].sum() == pytest.approx(np.exp(-((np.arange(13) - 6) ** 2) / 8).sum() ** 2, rel=1e-5)
    assert not target[1].any() and not target[2].any()
    # joint near the corner: mu = int(191/4 + .5) = 48 (outside), square clipped but still used
    assert target[3].max() > 0


@pytest.mark.parametrize("method", ["default", "dark", "argmax"])
def test_encode_decode_round_trip(method: str) -> None:
    rng = np.random.default_rng(0)
    joints = rng.uniform([20, 20], [172, 236], size=(17, 2))
    target, _ = encode_heatmaps(joints, np.ones(17), (192, 256), (48, 64))
    # crop == image: centre of the crop, scale covering exactly 192x256
    center = np.array([[96.0, 128.0]])
    scale = np.array([[192 / 200, 256 / 200]])
    preds, scores = decode_heatmaps(target[None], center, scale, method=method)
    # The MSRA target is centred on the rounded heatmap pixel: error <= 2 px (stride 4 / 2)
    # in the input, and the decoder itself must add at most 0.5 px on top of that.
    mu = np.floor(joints / 4 + 0.5) * 4
    assert np.abs(preds[0] - mu).max() <= 0.5 + 1e-4
    assert np.abs(preds[0] - joints).max() <= 2.5
    np.testing.assert_allclose(scores, 1.0)
