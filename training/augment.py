"""The mmpose 0.16 top-down train/test pipeline, step for step.

Each random step draws from an explicit ``np.random.Generator`` (the dataset makes
one per sample from seed, epoch and index), so augmentation is reproducible across
worker counts and across a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ditepose.model.codec import encode_heatmaps
from ditepose.model.transforms import PIXEL_STD, affine_transform_points, get_affine_transform

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation recipe; the defaults are the paper's (mmpose 0.16 COCO/MPII configs)."""

    flip_prob: float = 0.5
    half_body_prob: float = 0.3
    num_joints_half_body: int = 8
    scale_factor: float = 0.25
    rot_factor: float = 30.0
    rot_prob: float = 0.6
    sigma: float = 2.0

    @classmethod
    def none(cls, sigma: float = 2.0) -> AugmentConfig:
        """No random augmentation at all (overfitting, debugging)."""
        return cls(flip_prob=0.0, half_body_prob=0.0, scale_factor=0.0, rot_factor=0.0, rot_prob=0.0, sigma=sigma)


def fliplr_joints(
    joints: np.ndarray, visible: np.ndarray, img_width: int, flip_pairs: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """mmpose ``fliplr_joints``: swap left/right, mirror x, zero the invisible joints."""
    j, v = joints.copy(), visible.copy()
    for a, b in flip_pairs:
        j[[a, b]] = joints[[b, a]]
        v[[a, b]] = visible[[b, a]]
    j[:, 0] = img_width - 1 - j[:, 0]
    return j * v[:, None], v


def random_flip(s: dict[str, Any], rng: np.random.Generator, prob: float, flip_pairs: Sequence[Sequence[int]]) -> None:
    """TopDownRandomFlip: mirror the whole image, its joints and the box centre."""
    if prob > 0 and rng.random() <= prob:
        s["img"] = s["img"][:, ::-1]
        width = s["img"].shape[1]
        s["joints"], s["visible"] = fliplr_joints(s["joints"], s["visible"], width, flip_pairs)
        s["center"] = np.array([width - s["center"][0] - 1, s["center"][1]], dtype=np.float32)
        s["flipped"] = True


def half_body_box(
    joints: np.ndarray, visible: np.ndarray, upper_ids: Sequence[int], aspect_ratio: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray] | None:
    """mmpose ``half_body_transform``: box around the visible upper or lower body, scale x1.5."""
    upper = [joints[i] for i in range(len(joints)) if visible[i] > 0 and i in upper_ids]
    lower = [joints[i] for i in range(len(joints)) if visible[i] > 0 and i not in upper_ids]
    # mmpose draws randn() < 0.5 here (not rand()); kept for the same upper/lower mix.
    if rng.standard_normal() < 0.5 and len(upper) > 2:
        chosen = upper
    elif len(lower) > 2:
        chosen = lower
    else:
        chosen = upper
    if len(chosen) < 2:
        return None
    pts = np.asarray(chosen, dtype=np.float32)
    center = pts.mean(axis=0)[:2]
    w, h = (pts.max(axis=0) - pts.min(axis=0))[:2]
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    return center, np.array([w / PIXEL_STD, h / PIXEL_STD], dtype=np.float32) * 1.5


def half_body(s: dict[str, Any], rng: np.random.Generator, cfg: AugmentConfig, upper_ids: Sequence[int],
              aspect_ratio: float) -> None:
    """TopDownHalfBodyTransform (only for people with more than ``num_joints_half_body`` visible joints)."""
    if cfg.half_body_prob <= 0 or np.sum(s["visible"]) <= cfg.num_joints_half_body:
        return
    if rng.random() < cfg.half_body_prob:
        box = half_body_box(s["joints"], s["visible"], upper_ids, aspect_ratio, rng)
        if box is not None:
            s["center"], s["scale"] = box


def random_scale_rotation(s: dict[str, Any], rng: np.random.Generator, cfg: AugmentConfig) -> None:
    """TopDownGetRandomScaleRotation: scale x clip(N(1, sf)), rotation clip(N(0, rf)) with prob."""
    sf, rf = cfg.scale_factor, cfg.rot_factor
    s["scale"] = s["scale"] * np.clip(rng.standard_normal() * sf + 1, 1 - sf, 1 + sf)
    r = float(np.clip(rng.standard_normal() * rf, -rf * 2, rf * 2))
    s["rotation"] = r if rng.random() <= cfg.rot_prob else 0.0


def affine_crop(s: dict[str, Any], input_wh: Sequence[int]) -> None:
    """TopDownAffine: warp the box to the input size; map the visible joints with it."""
    trans = get_affine_transform(s["center"], s["scale"], s["rotation"], input_wh)
    img = np.ascontiguousarray(s["img"])
    s["img"] = cv2.warpAffine(img, trans, (int(input_wh[0]), int(input_wh[1])), flags=cv2.INTER_LINEAR)
    vis = s["visible"] > 0
    s["joints"] = s["joints"].copy()
    s["joints"][vis] = affine_transform_points(s["joints"][vis], trans)


def normalize(img_rgb_uint8: np.ndarray) -> np.ndarray:
    """ToTensor + NormalizeTensor: HWC uint8 RGB -> CHW float32 ImageNet-normalised."""
    img = img_rgb_uint8.astype(np.float32) / 255.0
    return np.ascontiguousarray(((img - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))


def apply_pipeline(
    s: dict[str, Any],
    rng: np.random.Generator | None,
    input_wh: Sequence[int],
    flip_pairs: Sequence[Sequence[int]],
    upper_ids: Sequence[int],
    cfg: AugmentConfig,
) -> dict[str, Any]:
    """Run the train (``rng`` given) or test (``rng`` None) pipeline on a sample dict.

    ``s`` holds img (HWC RGB uint8), joints [K,2], visible [K], center, scale; adds
    input (CHW float32), target [K,Hh,Wh], target_weight [K,1] and rotation.
    """
    s["rotation"] = 0.0
    s["flipped"] = False
    if rng is not None:
        random_flip(s, rng, cfg.flip_prob, flip_pairs)
        half_body(s, rng, cfg, upper_ids, input_wh[0] / input_wh[1])
        random_scale_rotation(s, rng, cfg)
    affine_crop(s, input_wh)
    heatmap_wh = (int(input_wh[0]) // 4, int(input_wh[1]) // 4)
    target, weight = encode_heatmaps(s["joints"], s["visible"], input_wh, heatmap_wh, sigma=cfg.sigma)
    s["input"] = normalize(s.pop("img"))
    s["target"] = target
    s["target_weight"] = weight[:, None].astype(np.float32)
    return s
