"""Heatmap encoding and decoding, bit-for-bit in mmpose 0.16 conventions.

Dite-HRNet's published numbers come from mmpose 0.16's MSRA Gaussian targets and its
``keypoints_from_heatmaps`` post-processing, so both are reproduced here (vectorised:
no per-joint Python loop except the tiny encoder, which runs on the training side).
Arithmetic stays in float32 like mmpose's so decoded coordinates match its goldens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import cv2
import numpy as np

from ditepose.model.transforms import PIXEL_STD

# Every decoder name a caller may use (REST, gRPC, jobs, CLIs): the canonical ones and their aliases.
DecoderName = Literal["default", "dark", "unbiased", "argmax", "none"]
DECODER_NAMES: tuple[str, ...] = get_args(DecoderName)
DECODERS = ("default", "dark", "argmax")  # canonical
_DECODER_ALIASES = {"default": "default", "dark": "dark", "unbiased": "dark", "argmax": "argmax", "none": "argmax"}
assert set(_DECODER_ALIASES) == set(DECODER_NAMES)


def normalize_decoder(name: str) -> str:
    """Canonical decoder name ('unbiased' -> 'dark', 'none' -> 'argmax'); ValueError for unknown names."""
    try:
        return _DECODER_ALIASES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown decoder {name!r}; choose one of {DECODERS}") from None


def encode_heatmaps(
    joints_xy: np.ndarray,
    visible: np.ndarray,
    image_size_wh: Sequence[int],
    heatmap_size_wh: Sequence[int],
    sigma: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """MSRA Gaussian targets of mmpose 0.16 ``TopDownGenerateTarget`` (non-unbiased).

    ``joints_xy`` are in input-crop pixels. Returns ``target [K, Hh, Wh]`` and
    ``target_weight [K]``; a joint gets weight 0 when invisible or when its 3-sigma
    square lies wholly outside the heatmap.
    """
    joints = np.asarray(joints_xy, dtype=np.float32).reshape(-1, 2)
    vis = np.asarray(visible).reshape(-1)
    if len(vis) != len(joints):
        raise ValueError(f"joints ({len(joints)}) and visible ({len(vis)}) differ in length")
    num_joints = len(joints)
    w, h = int(heatmap_size_wh[0]), int(heatmap_size_wh[1])
    feat_stride = np.asarray(image_size_wh, dtype=np.float64) / np.array([w, h], dtype=np.float64)
    target = np.zeros((num_joints, h, w), dtype=np.float32)
    weight = (vis > 0).astype(np.float32)
    tmp_size = sigma * 3
    size = int(2 * tmp_size + 1)
    x = np.arange(0, size, 1, dtype=np.float32)
    y = x[:, None]
    x0 = y0 = size // 2
    g = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))
    for j in range(num_joints):
        mu_x = int(joints[j, 0] / feat_stride[0] + 0.5)
        mu_y = int(joints[j, 1] / feat_stride[1] + 0.5)
        ul = (int(mu_x - tmp_size), int(mu_y - tmp_size))
        br = (int(mu_x + tmp_size + 1), int(mu_y + tmp_size + 1))
        if ul[0] >= w or ul[1] >= h or br[0] < 0 or br[1] < 0:
            weight[j] = 0.0
        if weight[j] <= 0.5:
            continue
        gx0, gx1 = max(0, -ul[0]), min(br[0], w) - ul[0]
        gy0, gy1 = max(0, -ul[1]), min(br[1], h) - ul[1]
        ix0, ix1 = max(0, ul[0]), min(br[0], w)
        iy0, iy1 = max(0, ul[1]), min(br[1], h)
        target[j, iy0:iy1, ix0:ix1] = g[gy0:gy1, gx0:gx1]
    return target, weight


def get_max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax location (float32, heatmap pixels) and value per map; -1 where the max is <= 0."""
    n, k, _, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, -1)
    idx = np.argmax(flat, axis=2)
    maxvals = np.take_along_axis(flat, idx[..., None], axis=2)[..., 0]
    preds = np.stack([idx % w, idx // w], axis=-1).astype(np.float32)
    preds = np.where((maxvals > 0.0)[..., None], preds, np.float32(-1))
    return preds, maxvals


def _gaussian_blur(heatmaps: np.ndarray, kernel: int) -> np.ndarray:
    """mmpose's zero-padded Gaussian blur (per map), rescaled so each map keeps its maximum."""
    if kernel % 2 != 1:
        raise ValueError(f"blur kernel must be odd, got {kernel}")
    border = (kernel - 1) // 2
    n, k, h, w = heatmaps.shape
    maps = heatmaps.reshape(n * k, h, w).astype(np.float32)
    origin_max = maps.max(axis=(1, 2))
    padded = np.zeros((n * k, h + 2 * border, w + 2 * border), dtype=np.float32)
    padded[:, border:-border, border:-border] = maps
    # One tall image: each map's zero border is as wide as the kernel radius, so maps never
    # see each other and the result is bit-identical to blurring them one by one.
    tall = cv2.GaussianBlur(padded.reshape(-1, w + 2 * border), (kernel, kernel), 0)
    out = np.ascontiguousarray(tall.reshape(n * k, h + 2 * border, w + 2 * border)[:, border:-border, border:-border])
    with np.errstate(divide="ignore", invalid="ignore"):
        out *= (origin_max / out.max(axis=(1, 2)))[:, None, None]
    return out.reshape(n, k, h, w)


def _peak_neighbourhood(
    shape: tuple[int, ...], preds: np.ndarray, reach: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where a refinement that reads ``reach`` pixels around each integer peak may step.

    Returns ``ok`` (the peaks mmpose refines: column and row above 1 and below size - reach), the
    peaks' columns and rows clipped so every read stays inside the map, and the sample and joint
    index grids [N, K] for fancy indexing. One place for both offsets' border rules.
    """
    n, k, h, w = shape
    px = preds[..., 0].astype(np.int64)
    py = preds[..., 1].astype(np.int64)
    ok = (px > 1) & (px < w - reach) & (py > 1) & (py < h - reach)
    x, y = np.clip(px, reach, w - 1 - reach), np.clip(py, reach, h - 1 - reach)
    ni, ki = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    return ok, x, y, ni, ki


def _quarter_offset(heatmaps: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """The 'default' refinement: +-0.25 px toward the higher neighbour, away from borders."""
    ok, pxc, pyc, ni, ki = _peak_neighbourhood(heatmaps.shape, preds, reach=1)
    dx = heatmaps[ni, ki, pyc, pxc + 1] - heatmaps[ni, ki, pyc, pxc - 1]
    dy = heatmaps[ni, ki, pyc + 1, pxc] - heatmaps[ni, ki, pyc - 1, pxc]
    shift = (np.sign(np.stack([dx, dy], axis=-1)) * np.float32(0.25)).astype(np.float32)
    return np.where(ok[..., None], preds + shift, preds).astype(np.float32)


def _taylor_offset(log_maps: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """DARK's second-order Taylor step on the log of the modulated heatmap."""
    ok, x, y, ni, ki = _peak_neighbourhood(log_maps.shape, preds, reach=2)

    def at(dy_: int, dx_: int) -> np.ndarray:
        return log_maps[ni, ki, y + dy_, x + dx_]

    c = at(0, 0)
    dx = np.float32(0.5) * (at(0, 1) - at(0, -1))
    dy = np.float32(0.5) * (at(1, 0) - at(-1, 0))
    dxx = np.float32(0.25) * (at(0, 2) - np.float32(2) * c + at(0, -2))
    dxy = np.float32(0.25) * (at(1, 1) - at(-1, 1) - at(1, -1) + at(-1, -1))
    dyy = np.float32(0.25) * (at(2, 0) - np.float32(2) * c + at(-2, 0))
    ok &= (dxx * dyy - dxy**2) != 0
    if not ok.any():
        return preds
    hessian = np.stack([np.stack([dxx, dxy], -1), np.stack([dxy, dyy], -1)], -2)[ok]
    derivative = np.stack([dx, dy], -1)[ok][..., None]
    offset = -(np.linalg.inv(hessian) @ derivative)[..., 0]
    out = preds.copy()
    out[ok] += offset.astype(np.float32)
    return out


def transform_preds(coords: np.ndarray, center: np.ndarray, scale: np.ndarray, heatmap_wh: Sequence[int]) -> np.ndarray:
    """Heatmap coordinates [N, K, 2] -> image pixels (mmpose 0.16, ``use_udp=False``)."""
    scale_px = np.asarray(scale, dtype=np.float32) * np.float32(PIXEL_STD)
    center = np.asarray(center, dtype=np.float32)
    size = np.asarray(heatmap_wh, dtype=np.float32)
    factor = (scale_px / size)[:, None, :]
    origin = (center - scale_px * np.float32(0.5))[:, None, :]
    return (coords.astype(np.float32) * factor + origin).astype(np.float32)


def decode_heatmaps(
    heatmaps: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray,
    method: str = "default",
    kernel: int = 11,
) -> tuple[np.ndarray, np.ndarray]:
    """mmpose 0.16 ``keypoints_from_heatmaps``: heatmaps [N,K,H,W] -> image coords [N,K,2], scores [N,K].

    ``method``: 'argmax' (post_process None), 'default' (quarter offset) or 'dark'
    (a.k.a. 'unbiased': Gaussian modulation with ``kernel``, log, Taylor step).
    """
    method = normalize_decoder(method)
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must be [N, K, H, W], got shape {heatmaps.shape}")
    n, _, h, w = heatmaps.shape
    center = np.asarray(center, dtype=np.float32).reshape(n, 2)
    scale = np.asarray(scale, dtype=np.float32).reshape(n, 2)
    preds, maxvals = get_max_preds(heatmaps)
    if method == "default":
        preds = _quarter_offset(heatmaps, preds)
    elif method == "dark":
        log_maps = np.log(np.maximum(_gaussian_blur(heatmaps, kernel), np.float32(1e-10)))
        preds = _taylor_offset(log_maps, preds)
    return transform_preds(preds, center, scale, (w, h)), maxvals


def flip_back(heatmaps: np.ndarray, flip_pairs: Sequence[Sequence[int]]) -> np.ndarray:
    """Undo a horizontal flip of the input: swap left/right channels and mirror along x."""
    heatmaps = np.asarray(heatmaps)
    index = np.arange(heatmaps.shape[1])
    for a, b in flip_pairs:
        index[a], index[b] = b, a
    return heatmaps[:, index, :, ::-1]


def flip_test_merge(
    heatmaps: np.ndarray,
    flipped_heatmaps_raw: np.ndarray,
    flip_pairs: Sequence[Sequence[int]],
    shift: bool = True,
) -> np.ndarray:
    """Average of the heatmaps and the flipped-back heatmaps of the mirrored input.

    With ``shift`` the flipped-back map moves one pixel right first (mmpose's
    ``shift_heatmap=True``, used by the Dite-HRNet test configs).
    """
    back = np.ascontiguousarray(flip_back(flipped_heatmaps_raw, flip_pairs))
    if shift:
        back[..., 1:] = back[..., :-1].copy()
    return (np.asarray(heatmaps, dtype=np.float32) + back.astype(np.float32)) * np.float32(0.5)
