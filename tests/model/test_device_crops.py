"""Torch crops (model/device_crops.py, TopDownPipeline(crop_backend="torch")) against the cv2 path.

The bound is 1 grey level (uint8 units, before normalisation): both sides sample bilinearly in
float32 and round, so only a value within float32 error of a .5 boundary may round differently.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditepose.model.device_crops import crop_matrices, image_to_device, sampling_theta, warp_crops
from ditepose.model.pipeline import IMAGENET_STD, PoseEstimator, TopDownPipeline, normalize_crops
from ditepose.model.transforms import box_to_center_scale

W_IN, H_IN = 192, 256
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _image(h: int, w: int, kind: str, seed: int) -> np.ndarray:
    """Test pictures: noise (gradients up to 255 per pixel), hard black/white edges, a smooth ramp."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    if kind == "edges":
        return ((rng.random((h, w, 3)) > 0.5) * 255).astype(np.uint8)
    ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
    return np.clip(ramp + np.array([0, 40, 80]), 0, 255).astype(np.uint8)


def _cv2_crops(img: np.ndarray, mats: np.ndarray, size_wh: tuple[int, int], flip: bool) -> np.ndarray:
    """The CPU path's crops [N, Ho, Wo, 3] uint8, as TopDownPipeline's cv2 backend cuts them."""
    crops = [cv2.warpAffine(img, m, size_wh, flags=cv2.INTER_LINEAR) for m in mats]
    if flip:
        crops += [cv2.flip(c, 1) for c in crops]
    return np.stack(crops)


def _torch_crops(img: np.ndarray, mats: np.ndarray, size_wh: tuple[int, int], flip: bool) -> np.ndarray:
    out = warp_crops(image_to_device(img, "cpu"), mats, size_wh, flip=flip)
    assert out.dtype == torch.float32 and out.shape == (len(mats) * (2 if flip else 1), 3, size_wh[1], size_wh[0])
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255  # whole grey levels
    return out.permute(0, 2, 3, 1).numpy()


def _diff(img: np.ndarray, mats: np.ndarray, size_wh: tuple[int, int], flip: bool) -> np.ndarray:
    ref = _cv2_crops(img, mats, size_wh, flip).astype(np.float32)
    return np.abs(_torch_crops(img, mats, size_wh, flip) - ref)


@st.composite
def _cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, tuple[int, int], bool]:
    """An image (1..640 px a side), 1-4 boxes anywhere (partly or wholly outside, tiny to several
    times the image), maybe rotated, and an output size."""
    h = draw(st.integers(1, 480))
    w = draw(st.integers(1, 640))
    img = _image(h, w, draw(st.sampled_from(["noise", "edges", "ramp"])), draw(st.integers(0, 2**16)))
    size_wh = draw(st.sampled_from([(W_IN, H_IN), (48, 64), (7, 5)]))
    n = draw(st.integers(1, 4))
    coord = st.floats(-1.0, 1.5)
    rel = st.floats(0.002, 3.0)
    centers, scales = [], []
    for _ in range(n):
        bw, bh = draw(rel) * w + 0.5, draw(rel) * h + 0.5
        box = [draw(coord) * w - bw / 2, draw(coord) * h - bh / 2, bw, bh]
        c, s = box_to_center_scale(box, size_wh[0] / size_wh[1], draw(st.floats(1.0, 1.5)))
        centers.append(c)
        scales.append(s)
    rotated = draw(st.booleans())
    rots = [draw(st.floats(-180.0, 180.0)) for _ in range(n)] if rotated else None
    mats = crop_matrices(np.stack(centers), np.stack(scales), size_wh, rots)
    return img, mats, size_wh, draw(st.booleans())


@PROPERTY
@given(case=_cases())
def test_torch_crops_within_one_grey_level_of_cv2(case: tuple[np.ndarray, np.ndarray, tuple[int, int], bool]) -> None:
    img, mats, size_wh, flip = case
    diff = _diff(img, mats, size_wh, flip)
    assert diff.max() <= 1.0, f"max abs diff {diff.max()} grey levels"


@pytest.mark.parametrize(("h", "w"), [(480, 640), (1080, 1920), (37, 23)])
@pytest.mark.parametrize("kind", ["noise", "edges", "ramp"])
def test_fixed_person_boxes_match_cv2(h: int, w: int, kind: str) -> None:
    """Person boxes inside, across every edge and corner, and larger than the image, with flip."""
    img = _image(h, w, kind, seed=h + w)
    boxes = np.array([
        [0.3 * w, 0.2 * h, 0.2 * w, 0.5 * h],  # inside
        [-0.1 * w, -0.1 * h, 0.3 * w, 0.4 * h],  # across the top-left corner
        [0.85 * w, 0.7 * h, 0.3 * w, 0.5 * h],  # across the bottom-right corner
        [-0.5 * w, -0.5 * h, 2.0 * w, 2.0 * h],  # around the whole image
        [1.2 * w, 0.5 * h, 0.1 * w, 0.1 * h],  # wholly outside: all border
    ])
    centers, scales = zip(*(box_to_center_scale(b, W_IN / H_IN) for b in boxes), strict=True)
    mats = crop_matrices(np.stack(centers), np.stack(scales), (W_IN, H_IN))
    diff = _diff(img, mats, (W_IN, H_IN), flip=True)
    assert diff.max() <= 1.0
    assert diff.mean() < 0.01  # a sub-pixel offset would move many pixels, not a few ties
    out = _torch_crops(img, mats[4:], (W_IN, H_IN), flip=False)
    assert not out.any()  # zero border, as cv2's BORDER_CONSTANT default


def test_one_to_one_crop_copies_the_pixels() -> None:
    """A crop whose matrix is a whole-pixel translation samples exactly at pixel centres: no blending,
    so the crop is the image region itself (checks the pixel-centre convention without a tolerance)."""
    img = _image(480, 640, "noise", seed=3)
    size = (200, 256)  # a 200 px wide crop: scale 1.0 is exact in float32, so is the matrix
    mats = crop_matrices(np.array([[300.0, 200.0]]), np.array([[1.0, 1.28]]), size)
    np.testing.assert_allclose(mats[0], [[1, 0, -200], [0, 1, -72]], atol=1e-9)  # getAffineTransform: 1e-13
    out = _torch_crops(img, mats, size, flip=True)
    np.testing.assert_array_equal(out[0], img[72 : 72 + 256, 200 : 200 + 200])
    np.testing.assert_array_equal(out[1], img[72 : 72 + 256, 200 : 200 + 200][:, ::-1])
    np.testing.assert_array_equal(out, _cv2_crops(img, mats, size, flip=True))


def test_half_pixel_ties_round_within_one_level() -> None:
    """2x magnification puts every other sample halfway between pixels: values like 100.5 that
    cv2 rounds to even, the worst case for the bound; odd neighbours make such ties everywhere."""
    img = np.zeros((200, 200, 3), np.uint8)
    img[:, ::2] = 101
    img[:, 1::2] = 100
    img[::2] += 2
    size = (200, 256)
    mats = crop_matrices(np.array([[100.0, 100.0]]), np.array([[0.5, 0.64]]), size)  # 100 px -> 200: 2x
    np.testing.assert_allclose(mats[0], [[2, 0, -100], [0, 2, -72]], atol=1e-9)
    ref = _cv2_crops(img, mats, size, flip=False)
    # odd crop columns fall halfway between image columns: x.5 values (100.5, 101.5, 102.5), all
    # rounded to even by cv2, so every one of them is a tie the torch side may round the other way
    assert (ref[0, :, 1::2] % 2 == 0).all() and len(np.unique(ref[0, :, 1::2])) >= 2
    diff = _diff(img, mats, size, flip=True)
    assert diff.max() <= 1.0


def test_sampling_theta_maps_pixel_centres() -> None:
    """theta sends a crop pixel's normalised centre to the normalised centre of M_inv @ (x, y)."""
    mats = crop_matrices(np.array([[50.0, 40.0]]), np.array([[0.6, 0.8]]), (W_IN, H_IN), [30.0])
    theta = sampling_theta(mats, (100, 120), (W_IN, H_IN))[0].astype(np.float64)
    inv = cv2.invertAffineTransform(mats[0])
    for x, y in [(0, 0), (191, 255), (17, 100)]:
        u = np.array([(2 * x + 1) / W_IN - 1, (2 * y + 1) / H_IN - 1, 1.0])
        src = inv @ np.array([x, y, 1.0])
        np.testing.assert_allclose(theta @ u, [(2 * src[0] + 1) / 120 - 1, (2 * src[1] + 1) / 100 - 1], atol=1e-6)


def test_warp_crops_checks_its_image_and_handles_no_persons() -> None:
    img = image_to_device(_image(20, 30, "noise", 0), "cpu")
    assert img.shape == (1, 3, 20, 30) and img.dtype == torch.float32
    assert warp_crops(img, np.zeros((0, 2, 3)), (W_IN, H_IN), flip=True).shape == (0, 3, H_IN, W_IN)
    with pytest.raises(ValueError, match="float image"):
        warp_crops(torch.zeros(1, 20, 30, 3, dtype=torch.uint8), np.zeros((1, 2, 3)), (W_IN, H_IN))
    with pytest.raises(ValueError, match="rotations"):
        crop_matrices(np.zeros((2, 2)), np.ones((2, 2)), (W_IN, H_IN), [0.0])


# --------------------------------------------------------------------------- the pipeline switch
BOXES = [[100, 50, 120, 300], [-40, 300, 200, 250], [560, -30, 150, 120]]  # two cross the edges


@pytest.mark.parametrize("flip", [True, False])
def test_pipeline_torch_backend_gives_the_cv2_layout_and_values(flip: bool) -> None:
    img = _image(480, 640, "noise", seed=7)
    cpu = TopDownPipeline(flip_test=flip).prepare(img, BOXES, [0.9, 0.8, 0.7])
    dev = TopDownPipeline(flip_test=flip, crop_backend="torch", crop_device="cpu").prepare(img, BOXES, [0.9, 0.8, 0.7])
    assert dev.crops.shape == cpu.crops.shape == (3 * (2 if flip else 1), 3, H_IN, W_IN)
    assert dev.crops.dtype == cpu.crops.dtype == torch.float32 and dev.crops.device.type == "cpu"
    assert dev.crops.is_contiguous()
    for field in ("centers", "scales", "boxes_xywh", "box_scores"):
        np.testing.assert_array_equal(getattr(dev, field), getattr(cpu, field))
    assert dev.flip == cpu.flip and dev.num_crops == cpu.num_crops
    # normalised units: 1 grey level is 1 / (255 std) per channel
    one_level = torch.tensor([1 / (255 * s) for s in IMAGENET_STD]).view(1, 3, 1, 1)
    assert ((dev.crops - cpu.crops).abs() <= one_level * 1.0001).all()
    # the same normalisation arithmetic: pixels of equal grey level give the same float
    equal = (dev.crops - cpu.crops).abs() < one_level / 2
    assert equal.float().mean() > 0.99 and torch.equal(dev.crops[equal], cpu.crops[equal])
    if flip:
        torch.testing.assert_close(dev.crops[3:], dev.crops[:3].flip(3), atol=0, rtol=0)


def test_pipeline_torch_backend_uint8_crops_and_the_other_entry_points() -> None:
    img = _image(480, 640, "edges", seed=8)
    raw_cv2 = TopDownPipeline(normalize_on_cpu=False)
    raw_torch = TopDownPipeline(normalize_on_cpu=False, crop_backend="torch", crop_device="cpu")
    a, b = raw_cv2.prepare(img, BOXES), raw_torch.prepare(img, BOXES)
    assert b.crops.dtype == torch.uint8 and b.crops.shape == a.crops.shape == (6, H_IN, W_IN, 3)
    assert (b.crops.int() - a.crops.int()).abs().max() <= 1
    assert normalize_crops(b.crops).shape == (6, 3, H_IN, W_IN)
    # whole image (no boxes), no persons, dataset records (centre/scale)
    whole_a, whole_b = raw_cv2.prepare(img), raw_torch.prepare(img)
    assert (whole_b.crops.int() - whole_a.crops.int()).abs().max() <= 1
    empty = raw_torch.prepare(img, np.zeros((0, 4)))
    assert empty.crops.shape == (0, H_IN, W_IN, 3) and empty.num_persons == 0
    centers, scales = a.centers, a.scales
    rec_a = raw_cv2.prepare_center_scale(img, centers, scales)
    rec_b = raw_torch.prepare_center_scale(img, centers, scales)
    assert (rec_b.crops.int() - rec_a.crops.int()).abs().max() <= 1


def test_estimator_poses_with_torch_crops_match_cv2_crops() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 17, 4, stride=4), torch.nn.Sigmoid())
    img = _image(480, 640, "ramp", seed=9)
    a = PoseEstimator(net, TopDownPipeline()).predict(img, BOXES)
    b = PoseEstimator(net, TopDownPipeline(crop_backend="torch", crop_device="cpu")).predict(img, BOXES)
    assert len(a) == len(b) == 3
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_allclose(pb.keypoints[:, :2], pa.keypoints[:, :2], atol=0.5)
        np.testing.assert_allclose(pb.keypoints[:, 2], pa.keypoints[:, 2], atol=0.02)


def test_pipeline_crop_backend_options_are_checked() -> None:
    assert TopDownPipeline().crop_backend == "cv2"
    with pytest.raises(ValueError, match="crop backend"):
        TopDownPipeline(crop_backend="pil")
    with pytest.raises(ValueError, match="need 'torch'"):
        TopDownPipeline(crops_on_device=True)
    pipe = TopDownPipeline(crop_backend="torch")
    assert pipe.crop_device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            TopDownPipeline(crop_backend="torch", crop_device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("normalize", [True, False])
def test_cuda_crops_match_cv2_and_stay_on_the_device_when_asked(normalize: bool) -> None:
    img = _image(480, 640, "noise", seed=10)
    cpu = TopDownPipeline(normalize_on_cpu=normalize).prepare(img, BOXES)
    back = TopDownPipeline(normalize_on_cpu=normalize, crop_backend="torch", crop_device="cuda").prepare(img, BOXES)
    kept = TopDownPipeline(normalize_on_cpu=normalize, crop_backend="torch", crop_device="cuda",
                           crops_on_device=True).prepare(img, BOXES)
    assert back.crops.device.type == "cpu" and kept.crops.device.type == "cuda"
    assert back.crops.dtype == kept.crops.dtype == cpu.crops.dtype and back.crops.shape == cpu.crops.shape
    torch.testing.assert_close(kept.crops.cpu(), back.crops, atol=0, rtol=0)
    unit = 1.0 / (255 * min(IMAGENET_STD)) if normalize else 1.0
    assert (back.crops.double() - cpu.crops.double()).abs().max() <= unit * 1.0001
