"""Top-down pipeline: crops, exact geometry round trips (incl. flip test) and a real network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditepose.model.keypoints import COCO, MPII
from ditepose.model.pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PersonPose,
    PoseEstimator,
    TopDownPipeline,
    normalize_crops,
    oks_nms,
)
from ditepose.model.transforms import affine_transform_points, get_affine_transform

W_IN, H_IN = 192, 256
W_HM, H_HM = 48, 64


def _image(h: int = 480, w: int = 640) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def _stick_figures() -> np.ndarray:
    """A 640x480 picture with three drawn stick figures in the boxes the tests use."""
    from ditepose.model.draw import draw_poses

    img = np.full((480, 640, 3), 90, np.uint8)
    img[:, :, 1] = np.linspace(40, 200, 640, dtype=np.uint8)[None]
    template = np.array([
        [0.5, 0.08], [0.45, 0.05], [0.55, 0.05], [0.4, 0.07], [0.6, 0.07], [0.3, 0.22], [0.7, 0.22],
        [0.2, 0.38], [0.8, 0.38], [0.15, 0.52], [0.85, 0.52], [0.38, 0.55], [0.62, 0.55],
        [0.36, 0.75], [0.64, 0.75], [0.35, 0.95], [0.65, 0.95],
    ])
    persons = []
    for x, y, w, h in [[50, 40, 100, 200], [300, 100, 150, 300], [500, 300, 130, 170]]:
        kpts = np.column_stack([x + template[:, 0] * w, y + template[:, 1] * h, np.ones(17)])
        persons.append(PersonPose(np.array([x, y, w, h], np.float32), 1.0, kpts.astype(np.float32)))
    return draw_poses(img, persons, COCO, draw_boxes=False)


def _unnormalise(crop: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((crop * std + mean) * 255).permute(1, 2, 0).numpy()


def test_prepare_shapes_and_normalisation() -> None:
    img = np.zeros((480, 640, 3), np.uint8)
    img[100:300, 200:300] = (255, 0, 0)  # a red person-sized block
    pipe = TopDownPipeline(flip_test=True)
    boxes = np.array([[200, 100, 100, 200], [10, 10, 50, 60]], np.float32)
    prep = pipe.prepare(img, boxes, [0.9, 0.5])
    assert prep.crops.shape == (4, 3, H_IN, W_IN) and prep.crops.dtype == torch.float32
    assert prep.num_persons == 2 and prep.flip
    np.testing.assert_allclose(prep.box_scores, [0.9, 0.5])
    # box (200,100,100,200): aspect 0.5 < 0.75 -> width grows to 150, then padding 1.25
    np.testing.assert_allclose(prep.centers[0], [250, 200])
    np.testing.assert_allclose(prep.scales[0], [150 / 200 * 1.25, 200 / 200 * 1.25], rtol=1e-6)
    crop = _unnormalise(prep.crops[0])
    # the crop centre is the box centre: pure red there, RGB order kept
    np.testing.assert_allclose(crop[H_IN // 2, W_IN // 2], [255, 0, 0], atol=0.01)
    # the mirrored crop is the flip of the first one
    torch.testing.assert_close(prep.crops[2], prep.crops[0].flip(2))
    # padding outside the image is black (zero border) -> normalised to -mean/std
    crop1 = _unnormalise(prep.crops[1])
    np.testing.assert_allclose(crop1[0, 0], [0, 0, 0], atol=0.01)


def test_prepare_matches_affine_warp_of_a_marker() -> None:
    img = np.zeros((480, 640, 3), np.uint8)
    img[240:244, 400:404] = 255  # marker centred at (401.5, 241.5)
    pipe = TopDownPipeline(flip_test=False)
    prep = pipe.prepare(img, [[300, 100, 180, 300]])
    mat = get_affine_transform(prep.centers[0], prep.scales[0], 0, (W_IN, H_IN))
    expected = affine_transform_points(np.array([401.5, 241.5]), mat)
    gray = _unnormalise(prep.crops[0]).mean(-1)
    ys, xs = np.nonzero(gray > 100)
    weights = gray[ys, xs]
    centroid = np.array([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()
    np.testing.assert_allclose(centroid, expected, atol=0.6)


def test_whole_image_when_no_boxes() -> None:
    pipe = TopDownPipeline(flip_test=False)
    prep = pipe.prepare(_image(), None)
    np.testing.assert_array_equal(prep.boxes_xywh, [[0, 0, 640, 480]])
    np.testing.assert_allclose(prep.centers[0], [320, 240])


def test_empty_boxes_give_no_persons() -> None:
    pipe = TopDownPipeline()
    prep = pipe.prepare(_image(), np.zeros((0, 4)))
    assert prep.crops.shape[0] == 0
    assert pipe.finish(prep, np.zeros((0, 17, H_HM, W_HM), np.float32)) == []


@pytest.mark.parametrize(
    ("image", "boxes", "match"),
    [
        (np.zeros((10, 10), np.float32), None, "uint8"),
        (np.zeros((10, 10, 2), np.uint8), None, "HxWx3"),
        (np.zeros((10, 10, 3), np.uint8), [[0, 0, 0, 5]], "positive width"),
        (np.zeros((10, 10, 3), np.uint8), [[0, 0, 5]], r"\[N, 4\]"),
        (np.zeros((10, 10, 3), np.uint8), [[0, 0, np.nan, 5]], "finite"),
    ],
)
def test_bad_input_is_rejected(image: np.ndarray, boxes: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TopDownPipeline().prepare(image, boxes)


def _peak_maps(n: int, peaks: np.ndarray) -> np.ndarray:
    """[n, K, H, W] zero maps with a 1 at peaks[n, k] = (x, y) heatmap pixel."""
    maps = np.zeros((n, peaks.shape[1], H_HM, W_HM), np.float32)
    for i in range(n):
        for k, (x, y) in enumerate(peaks[i]):
            maps[i, k, y, x] = 1.0
    return maps


@pytest.mark.parametrize("flip", [False, True])
def test_prepare_finish_round_trip_is_exact(flip: bool) -> None:
    rng = np.random.default_rng(1)
    pipe = TopDownPipeline(flip_test=flip, decoder="argmax")
    boxes = np.array([[100, 50, 120, 300], [300, 200, 200, 150], [5, 5, 40, 40]], np.float32)
    prep = pipe.prepare(_image(), boxes, [1.0, 0.8, 0.5])
    peaks = rng.integers([2, 0], [W_HM, H_HM], size=(3, 17, 2))  # x >= 2: the shift keeps column 0
    maps = _peak_maps(3, peaks)
    if flip:
        # what the network would output on the mirrored crop: joints swapped and x mirrored;
        # flip-back plus the one-pixel shift must bring x back to the original column
        flip_index = COCO.flip_index()
        unshifted = np.roll(maps, -1, axis=-1)
        mirrored = np.zeros_like(maps)
        mirrored[:, flip_index] = unshifted[..., ::-1]
        maps = np.concatenate([maps, mirrored])
    persons = pipe.finish(prep, torch.from_numpy(maps))
    assert len(persons) == 3
    for i, person in enumerate(persons):
        # independent check: heatmap pixel -> crop pixel (stride 4) -> inverse affine -> image
        inv = get_affine_transform(prep.centers[i], prep.scales[i], 0, (W_IN, H_IN), inv=True)
        expected = affine_transform_points(peaks[i] * 4.0, inv)
        np.testing.assert_allclose(person.keypoints[:, :2], expected, atol=1e-3)
        np.testing.assert_allclose(person.keypoints[:, 2], 1.0)
        assert person.score == pytest.approx(prep.box_scores[i])
        np.testing.assert_array_equal(person.bbox_xywh, boxes[i])


def test_person_score_is_box_score_times_mean_of_confident_joints() -> None:
    pipe = TopDownPipeline(flip_test=False)
    prep = pipe.prepare(_image(), [[100, 100, 100, 200]], [0.5])
    maps = _peak_maps(1, np.full((1, 17, 2), 20))
    maps[0, :10] *= 0.8
    maps[0, 10:14] *= 0.1  # below vis_thr 0.2: ignored
    maps[0, 14:] *= 0.4
    (person,) = pipe.finish(prep, maps)
    assert person.score == pytest.approx(0.5 * (10 * 0.8 + 3 * 0.4) / 13, rel=1e-6)


def test_finish_rejects_wrong_heatmap_count() -> None:
    pipe = TopDownPipeline(flip_test=True)
    prep = pipe.prepare(_image(), [[10, 10, 50, 50]])
    with pytest.raises(ValueError, match="expected heatmaps"):
        pipe.finish(prep, np.zeros((1, 17, H_HM, W_HM), np.float32))


def test_person_to_dict_names_joints() -> None:
    kpts = np.column_stack([np.arange(17), np.arange(17) * 2, np.full(17, 0.5)]).astype(np.float32)
    data = PersonPose(np.array([1, 2, 3, 4], np.float32), 0.7, kpts).to_dict(COCO)
    assert data["bbox"] == [1, 2, 3, 4] and data["score"] == pytest.approx(0.7)
    assert data["keypoints"][9] == {"name": "left_wrist", "x": 9.0, "y": 18.0, "score": 0.5}
    with pytest.raises(ValueError):
        PersonPose(np.zeros(4), 0.1, kpts).to_dict(MPII)


def test_oks_nms_drops_duplicates() -> None:
    kpts = np.column_stack([np.linspace(100, 200, 17), np.linspace(50, 300, 17), np.ones(17)])
    a = PersonPose(np.array([90, 40, 120, 270]), 0.9, kpts, area=120 * 270)
    b = PersonPose(np.array([91, 41, 120, 270]), 0.8, kpts + 1.0, area=120 * 270)
    c = PersonPose(np.array([400, 40, 120, 270]), 0.7, kpts + np.array([300, 0, 0]), area=120 * 270)
    kept = oks_nms([b, c, a], thr=0.9)
    assert [p.score for p in kept] == [0.9, 0.7]


def test_estimator_with_random_dite_hrnet() -> None:
    from ditepose.model import build_model

    torch.manual_seed(0)
    net = build_model("dite_hrnet_18", num_joints=17)
    img = _stick_figures()
    estimator = PoseEstimator(net, TopDownPipeline(flip_test=True), batch_size=3)
    boxes = [[50, 40, 100, 200], [300, 100, 150, 300], [500, 300, 130, 170]]
    persons = estimator.predict(img, boxes, [0.9, 0.8, 0.7])
    assert not net.training
    assert len(persons) == 3
    for person, box in zip(persons, boxes, strict=True):
        assert person.keypoints.shape == (17, 3)
        assert np.isfinite(person.keypoints).all()
        x, y, w, h = box
        # keypoints land inside the padded box region (all-negative maps decode to heatmap
        # pixel -1, so allow one heatmap pixel beyond it)
        cx, cy = x + w / 2, y + h / 2
        crop_w, crop_h = 1.25 * max(w, 0.75 * h), 1.25 * max(h, w / 0.75)
        assert (np.abs(person.keypoints[:, 0] - cx) <= crop_w * (0.5 + 1 / W_HM) + 1e-3).all()
        assert (np.abs(person.keypoints[:, 1] - cy) <= crop_h * (0.5 + 1 / H_HM) + 1e-3).all()
    whole = estimator.predict(img)
    assert len(whole) == 1
    # whole image 640x480 -> crop 800 px wide centred at x=320 (plus the -1 pixel of empty maps)
    assert ((whole[0].keypoints[:, 0] >= -80 - 800 / W_HM) & (whole[0].keypoints[:, 0] <= 720)).all()


def test_device_side_normalisation_matches_cpu() -> None:
    img, boxes = _image(), [[100, 50, 120, 300], [300, 200, 200, 150]]
    cpu = TopDownPipeline(flip_test=True).prepare(img, boxes)
    raw = TopDownPipeline(flip_test=True, normalize_on_cpu=False).prepare(img, boxes)
    assert raw.crops.dtype == torch.uint8 and raw.crops.shape == (4, H_IN, W_IN, 3)
    assert raw.num_crops == cpu.num_crops == 4
    torch.testing.assert_close(normalize_crops(raw.crops), cpu.crops, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        normalize_crops(cpu.crops)


def test_estimator_gives_same_poses_with_device_side_normalisation() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 17, 4, stride=4), torch.nn.Sigmoid())
    img, boxes = _image(), [[100, 50, 120, 300], [300, 200, 200, 150]]
    a = PoseEstimator(net, TopDownPipeline()).predict(img, boxes)
    b = PoseEstimator(net, TopDownPipeline(normalize_on_cpu=False)).predict(img, boxes)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_allclose(pa.keypoints, pb.keypoints, atol=1e-4)
