"""Person crops and their mirrored copies sampled with torch (``affine_grid`` + ``grid_sample``).

The CPU path of :class:`~ditepose.model.pipeline.TopDownPipeline` warps one crop at a time with
``cv2.warpAffine``; on an accelerator that is K small host-side jobs plus a big host-to-device
copy of the crops. Here the image goes to the device once and all K crops are sampled in one
``grid_sample`` call, so crop work and traffic stop scaling with the number of persons on the host.

The geometry is the CPU path's, term for term:

* the forward matrices come from :func:`~ditepose.model.transforms.get_affine_transform`, and
  ``cv2.invertAffineTransform`` inverts them as ``cv2.warpAffine`` does internally;
* cv2 maps output pixel (x, y) to source point ``M_inv @ (x, y, 1)`` with integer coordinates
  at pixel centres; ``grid_sample(align_corners=False)`` puts normalised -1/+1 at the outer
  pixel edges, so the pixel-to-normalised maps are ``u = (2x + 1) / W - 1`` on both sides and
  are folded into one 2x3 ``theta`` per crop (:func:`sampling_theta`);
* cv2 ``BORDER_CONSTANT`` with value 0 reads every tap outside the image as 0, which is
  ``padding_mode="zeros"``;
* cv2 rounds the bilinear value to the nearest integer (ties to even) and saturates to uint8:
  :func:`warp_crops` does the same, so its float output holds uint8 grey levels.

OpenCV 5.1 (the one installed) warps uint8 images with ``INTER_LINEAR`` in float32 (imgproc's
warp_kernels: source coordinates, weights and the blend), so the two paths differ only by float32
rounding, which can move a value across a .5 boundary: at most 1 grey level, on a small fraction
of pixels (about 0.05 % on noise; about 11 % of a crop made of exact .5 ties).
OpenCV releases before those kernels quantised coordinates to 1/32 px with fixed-point weights
(INTER_BITS=5), up to 1/64 px from exact bilinear sampling: several grey levels on sharp edges,
so against such a cv2 the 1-level bound does not hold.

Shape glossary: P persons, Hi x Wi the image, Ho x Wo the network input (``output_size_wh`` is
(Wo, Ho)); crops are NCHW [N, 3, Ho, Wo] with N = P, or 2P with the flip test (mirrored last).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ditepose.model.transforms import get_affine_transform


def crop_matrices(
    centers: np.ndarray,
    scales: np.ndarray,
    output_size_wh: Sequence[int],
    rotations_deg: np.ndarray | Sequence[float] | None = None,
) -> np.ndarray:
    """Forward affine matrices [P, 2, 3] (image px -> crop px) of centres [P, 2] and scales [P, 2].

    The same matrices the cv2 path hands to ``cv2.warpAffine`` (float64, from
    :func:`get_affine_transform`); ``rotations_deg`` [P] defaults to 0 (the test pipeline's)."""
    centers = np.asarray(centers, np.float32).reshape(-1, 2)
    scales = np.asarray(scales, np.float32).reshape(-1, 2)
    rots = np.zeros(len(centers)) if rotations_deg is None else np.asarray(rotations_deg, np.float64).reshape(-1)
    if len(scales) != len(centers) or len(rots) != len(centers):
        raise ValueError(f"{len(centers)} centres, {len(scales)} scales and {len(rots)} rotations")
    out = np.zeros((len(centers), 2, 3), np.float64)
    for i in range(len(centers)):
        out[i] = get_affine_transform(centers[i], scales[i], float(rots[i]), output_size_wh)
    return out


def sampling_theta(matrices: np.ndarray, image_hw: Sequence[int], output_size_wh: Sequence[int]) -> np.ndarray:
    """``affine_grid`` thetas [P, 2, 3] float32 for forward matrices [P, 2, 3] on an image of ``image_hw``.

    theta = N_in @ M_inv @ N_out^-1 with N the pixel-centre -> normalised map of each side
    (``align_corners=False``); composed in float64 so float32 rounding happens once."""
    mats = np.asarray(matrices, np.float64).reshape(-1, 2, 3)
    hi, wi = int(image_hw[0]), int(image_hw[1])
    wo, ho = int(output_size_wh[0]), int(output_size_wh[1])
    n_in = np.array([[2.0 / wi, 0.0, 1.0 / wi - 1.0], [0.0, 2.0 / hi, 1.0 / hi - 1.0], [0.0, 0.0, 1.0]])
    n_out_inv = np.array([[wo / 2.0, 0.0, (wo - 1) / 2.0], [0.0, ho / 2.0, (ho - 1) / 2.0], [0.0, 0.0, 1.0]])
    thetas = np.zeros((len(mats), 2, 3), np.float64)
    for i, mat in enumerate(mats):
        inv = np.vstack([cv2.invertAffineTransform(mat), [0.0, 0.0, 1.0]])  # crop px -> image px, like cv2
        thetas[i] = (n_in @ inv @ n_out_inv)[:2]
    return thetas.astype(np.float32)


def image_to_device(image_rgb: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 HWC image [Hi, Wi, 3] -> float32 [1, 3, Hi, Wi] on ``device``; the upload stays uint8."""
    img = torch.from_numpy(np.ascontiguousarray(image_rgb)).to(device)
    return img.permute(2, 0, 1).unsqueeze(0).float()


def warp_crops(
    image: torch.Tensor, matrices: np.ndarray, output_size_wh: Sequence[int], flip: bool = False
) -> torch.Tensor:
    """Bilinear crops of ``image`` (float32 [1, 3, Hi, Wi], see :func:`image_to_device`), zero border.

    ``matrices`` [P, 2, 3] are the forward matrices (:func:`crop_matrices`). Returns float32
    [N, 3, Ho, Wo] on the image's device holding whole grey levels 0..255 (cv2's rounding), with
    N = 2P and the mirrored crops (``cv2.flip(crop, 1)``: the same pixels, columns reversed) last
    when ``flip``."""
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3 or not image.is_floating_point():
        raise ValueError(f"expected a float image [1, 3, H, W], got {image.dtype} {tuple(image.shape)}")
    wo, ho = int(output_size_wh[0]), int(output_size_wh[1])
    p = len(matrices)
    if p == 0:
        return torch.zeros((0, 3, ho, wo), dtype=torch.float32, device=image.device)
    theta = torch.from_numpy(sampling_theta(matrices, image.shape[2:], (wo, ho))).to(image.device)
    grid = F.affine_grid(theta, [p, 3, ho, wo], align_corners=False)  # [P, Ho, Wo, 2]
    # one sampling call for all persons: the P grids stacked as rows of a single [1, P*Ho, Wo] grid
    sampled = F.grid_sample(
        image, grid.reshape(1, p * ho, wo, 2), mode="bilinear", padding_mode="zeros", align_corners=False
    )  # [1, 3, P*Ho, Wo]
    crops = sampled.reshape(3, p, ho, wo).transpose(0, 1)
    crops = crops.round_().clamp_(0.0, 255.0)  # round half to even + saturate, as cv2 stores uint8
    if flip:
        return torch.cat([crops, crops.flip(3)])
    return crops.contiguous()
