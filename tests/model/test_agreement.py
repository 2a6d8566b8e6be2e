"""The precision agreement check: reference crops, decoded-keypoint error, the verdict and its message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ditepose.model import build_model, load_checkpoint
from ditepose.model.engines.agreement import (
    REFERENCE_FILE,
    AgreementBounds,
    AgreementRefused,
    check_agreement,
    compare_heatmaps,
    decode_to_input_px,
    per_joint_table,
    reference_crops,
    require_agreement,
    torch_fp32_reference,
)

DEMO_CHECKPOINT = Path(__file__).resolve().parents[2] / "model" / "weights" / "dite_hrnet_18_coco_demo.pth"


def peaks(xy: np.ndarray, hw: tuple[int, int] = (64, 48), sigma: float = 2.0) -> np.ndarray:
    """Gaussian heatmaps [N, K, h, w] peaking at heatmap pixels ``xy`` [N, K, 2]."""
    ys, xs = np.mgrid[0 : hw[0], 0 : hw[1]]
    out = np.exp(-((xs - xy[..., 0, None, None]) ** 2 + (ys - xy[..., 1, None, None]) ** 2) / (2 * sigma**2))
    return out.astype(np.float32)


def grid(n: int = 10, k: int = 17, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(4, 44, (n, k)), rng.integers(4, 60, (n, k))], -1).astype(np.float64)


def test_the_reference_crops_ship_with_the_package():
    assert REFERENCE_FILE.is_file() and REFERENCE_FILE.suffix == ".pt"  # *.pt is package data
    crops = reference_crops((256, 192))
    assert crops.shape == (20, 3, 256, 192) and crops.dtype == torch.float32
    assert torch.equal(crops[10:], crops[:10].flip(-1))  # the mirrored copies of the flip test
    assert torch.equal(crops, reference_crops((256, 192)))  # fixed
    assert reference_crops((256, 256), flip=False).shape == (10, 3, 256, 256)
    assert reference_crops((128, 96)).shape == (20, 3, 128, 96)
    assert -3 < float(crops.mean()) < 3 and float(crops.std()) > 0.5  # ImageNet-normalised photos


def test_keypoints_are_decoded_in_input_pixels():
    xy = np.array([[[10.0, 20.0], [30.0, 5.0]]])
    coords, scores = decode_to_input_px(peaks(xy), (256, 192))
    # heatmap pixel x -> x * 4 in a 192-wide input with a 48-wide heatmap (mmpose's mapping)
    assert np.allclose(coords, xy * 4, atol=1e-3)
    assert np.allclose(scores, 1.0)


def test_identical_heatmaps_agree():
    maps = peaks(grid())
    report = compare_heatmaps(maps, maps.copy(), (256, 192), "same")
    assert report.passed and report.moved == 0 and report.heatmap_max_abs == 0.0
    assert report.joints == 170 and report.crops == 10
    assert report.verdict().startswith("accepted: same: 0 of 170 joints")


def test_joints_moved_past_the_bound_are_counted_and_refused():
    xy = grid()
    moved_xy = xy.copy()
    moved_xy[:2, 3, 0] += 3  # 2 joints moved by 3 heatmap px = 12 input px
    moved_xy[5, 7, 1] += 0.5  # one nudged by 2 input px: within 4 px
    ref, got = peaks(xy), peaks(moved_xy)
    report = compare_heatmaps(ref, got, (256, 192), "shifted")  # default bounds: 4 px, 5% of the joints
    assert report.moved == 2
    assert report.max_px == pytest.approx(12.0, abs=1.5)
    assert report.joint_p99_px[3] > 4.0 and report.joint_p50_px[3] == 0.0
    assert report.moved_share == pytest.approx(2 / 170) and report.passed
    strict = compare_heatmaps(ref, got, (256, 192), "shifted", AgreementBounds(4.0, 0.005))
    assert not strict.passed
    message = strict.verdict()
    assert message.startswith("refused: shifted: 2 of 170 joints (1.2%) moved more than 4 px")
    assert "the limit is 0.5%" in message


def test_a_nan_output_never_passes():
    maps = peaks(grid())
    broken = maps.copy()
    broken[0, 0, 0, 0] = np.nan
    report = compare_heatmaps(maps, broken, (256, 192), "nan")
    assert not report.passed
    assert json.loads(json.dumps(report.to_dict()))["heatmap_max_abs"] is None


def test_mismatched_heatmaps_are_an_error():
    with pytest.raises(ValueError, match="one shape"):
        compare_heatmaps(np.zeros((2, 17, 64, 48)), np.zeros((2, 17, 32, 24)), (256, 192))


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="bounds"):
        AgreementBounds(shift_px=0)
    with pytest.raises(ValueError, match="bounds"):
        AgreementBounds(max_moved_share=1.5)


def test_require_agreement_raises_with_the_report():
    xy = grid()
    moved = xy.copy()
    moved[:, :, 0] += 5  # every joint moved 20 px
    report = compare_heatmaps(peaks(xy), peaks(moved), (256, 192), "bad")
    with pytest.raises(AgreementRefused, match="refused: bad: 170 of 170") as caught:
        require_agreement(report)
    assert caught.value.report is report
    ok = compare_heatmaps(peaks(xy), peaks(xy), (256, 192), "good")
    assert require_agreement(ok) is ok


def test_the_report_serialises_and_tabulates():
    report = compare_heatmaps(peaks(grid()), peaks(grid()), (256, 192), "same")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] and len(data["joint_p50_px"]) == 17 and data["shift_px"] == 4.0
    table = per_joint_table(report, [f"j{k}" for k in range(17)])
    assert table.splitlines()[1].split() == ["j0", "0.00", "0.00"]


@pytest.fixture(scope="module")
def demo18() -> torch.nn.Module:
    model = build_model("dite_hrnet_18")
    load_checkpoint(model, DEMO_CHECKPOINT)
    return model.eval()


def test_the_fp32_torch_engine_agrees_with_itself_and_a_damaged_copy_is_refused(demo18):
    reference = torch_fp32_reference(demo18)
    same = check_agreement(reference, reference, (128, 96), "itself")
    assert same.passed and same.moved == 0 and same.heatmap_max_abs == 0.0 and same.crops == 20
    damaged = build_model("dite_hrnet_18")
    damaged.load_state_dict(demo18.state_dict())
    with torch.no_grad():  # the heatmap head's weights, shuffled across joints: every joint lands elsewhere
        weight = damaged.keypoint_head.final_layer.weight
        weight.copy_(weight[torch.randperm(17, generator=torch.Generator().manual_seed(0))])
    report = check_agreement(torch_fp32_reference(damaged.eval()), reference, (128, 96), "damaged")
    assert not report.passed and report.moved_share > 0.5, report.verdict()
