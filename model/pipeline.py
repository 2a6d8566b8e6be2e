"""Top-down pose pipeline: boxes -> normalised crops -> (network) -> keypoints in image pixels.

It is split into :meth:`TopDownPipeline.prepare` and :meth:`TopDownPipeline.finish` so a
dynamic batcher (or a remote engine) can sit between the two halves. Geometry and
decoding follow mmpose 0.16 (``TopDownAffine``, ``keypoints_from_heatmaps``, flip test
with ``shift_heatmap=True``) so accuracy matches the paper's evaluation protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from ditepose.model.codec import decode_heatmaps, flip_test_merge, normalize_decoder
from ditepose.model.device_crops import crop_matrices, image_to_device, warp_crops
from ditepose.model.keypoints import COCO, KeypointSpec
from ditepose.model.oks import oks_nms_indices
from ditepose.model.transforms import PIXEL_STD, box_to_center_scale, get_affine_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIS_THR = 0.2  # mmpose's COCO evaluation: joints above it count toward the person score
# Who cuts the crops: "cv2" one warpAffine per person on the host; "torch" all persons in one
# grid_sample on ``crop_device`` (model/device_crops.py; within 1 grey level of cv2).
CROP_BACKENDS = ("cv2", "torch")


@dataclass
class PreparedBatch:
    """Network input for the persons of one image plus what :meth:`finish` needs to map back."""

    # [P * (2 if flip else 1), 3, H, W] float32 normalised RGB, mirrored crops last; or, with
    # ``normalize_on_cpu=False``, the uint8 [.., H, W, 3] crops (see :func:`normalize_crops`).
    # On the CPU, except with ``crop_backend="torch", crops_on_device=True`` (on ``crop_device``).
    crops: torch.Tensor
    centers: np.ndarray  # [P, 2] float32 box centres (px)
    scales: np.ndarray  # [P, 2] float32 padded box sizes in units of 200 px
    boxes_xywh: np.ndarray  # [P, 4] float32 input boxes
    box_scores: np.ndarray  # [P] float32
    flip: bool

    @property
    def num_persons(self) -> int:
        return len(self.centers)

    @property
    def num_crops(self) -> int:
        """Network inputs: persons, twice with the flip test; ``finish`` wants this many heatmaps."""
        return len(self.crops)


@dataclass(eq=False)  # holds arrays: compare by identity
class PersonPose:
    """One person: box, rescored confidence and keypoints [K, 3] = (x, y, score) in image pixels."""

    bbox_xywh: np.ndarray
    score: float
    keypoints: np.ndarray
    area: float = field(default=0.0)  # padded box area (mmpose's OKS-NMS area)

    def to_dict(self, spec: KeypointSpec) -> dict:
        if len(self.keypoints) != spec.num_joints:
            raise ValueError(f"{len(self.keypoints)} keypoints but spec {spec.name!r} has {spec.num_joints}")
        return {
            "bbox": [round(float(v), 2) for v in self.bbox_xywh],
            "score": float(self.score),
            "keypoints": [
                {"name": name, "x": float(x), "y": float(y), "score": float(s)}
                for name, (x, y, s) in zip(spec.joint_names, self.keypoints.tolist(), strict=True)
            ],
        }


# The ImageNet normalisation as one multiply-add per channel on 0..255 values, float32. Every path
# that normalises (the CPU crops, :func:`normalize_crops` at batch time or on a device) uses these
# same constants and ops, so a crop normalised late equals one normalised early bit for bit.
NORM_SCALE = torch.from_numpy(np.array([1 / (255.0 * s) for s in IMAGENET_STD], np.float32)).view(1, 3, 1, 1)
NORM_SHIFT = torch.from_numpy(
    np.array([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)], np.float32)).view(1, 3, 1, 1)


def normalize_crops(crops: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 RGB crops [N, H, W, 3] -> ImageNet-normalised float32 [N, 3, H, W], on the crops' device.

    Lets an engine ship 4x smaller uint8 crops to an accelerator and normalise there, and lets the
    service keep crops uint8 while they wait in a queue (a float32 crop is 4x the memory) and
    normalise them when their batch is assembled, into ``out`` (a float32 [N, 3, H, W] slice of
    the batch) when given.
    """
    if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"expected uint8 crops [N, H, W, 3], got {crops.dtype} {tuple(crops.shape)}")
    shape = (crops.shape[0], 3, *crops.shape[1:3])
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=crops.device)
    elif out.dtype != torch.float32 or tuple(out.shape) != shape:
        raise ValueError(f"out must be float32 {shape}, got {out.dtype} {tuple(out.shape)}")
    out.copy_(crops.permute(0, 3, 1, 2))
    return out.mul_(NORM_SCALE.to(out.device)).add_(NORM_SHIFT.to(out.device))


def _check_image(image_rgb: np.ndarray) -> np.ndarray:
    img = np.asarray(image_rgb)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image must be HxWx3 RGB, got shape {img.shape}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[..., :3]
    if img.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {img.dtype}")
    return np.ascontiguousarray(img)


def _check_boxes(
    boxes_xywh: np.ndarray | Sequence | None, box_scores: np.ndarray | Sequence | None, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    if boxes_xywh is None:
        return np.array([[0, 0, width, height]], np.float32), np.ones(1, np.float32)
    boxes = np.asarray(boxes_xywh, dtype=np.float32)
    if boxes.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 5):
        raise ValueError(f"boxes must be [N, 4] (x, y, w, h) or [N, 5] with a score, got {boxes.shape}")
    if box_scores is None:
        scores = boxes[:, 4].copy() if boxes.shape[1] == 5 else np.ones(len(boxes), np.float32)
    else:
        scores = np.asarray(box_scores, dtype=np.float32).reshape(-1)
        if len(scores) != len(boxes):
            raise ValueError(f"{len(scores)} box scores for {len(boxes)} boxes")
    boxes = boxes[:, :4]
    if not np.isfinite(boxes).all() or (boxes[:, 2:] <= 0).any():
        raise ValueError("boxes must be finite with positive width and height")
    return boxes, scores


class TopDownPipeline:
    """Pre- and post-processing around a heatmap network (mmpose 0.16 top-down test pipeline).

    ``crop_backend`` picks who cuts the crops (:data:`CROP_BACKENDS`): "cv2" (the default) on the
    host, or "torch" on ``crop_device`` (default: "cuda" when present, else "cpu"), which uploads
    the uint8 image once and samples every person (and the mirrored copies) in one call. Either
    way ``normalize_on_cpu`` says whether crops come normalised (float32 NCHW; with "torch" the
    normalisation runs on ``crop_device``) or as uint8 NHWC. Crops come back to the CPU, the
    layout every engine, batcher and process boundary takes, unless ``crops_on_device``: then
    they stay on ``crop_device`` for an engine in this process on that same device.
    """

    def __init__(
        self,
        input_size_wh: tuple[int, int] = (192, 256),
        spec: KeypointSpec = COCO,
        flip_test: bool = True,
        decoder: str = "default",
        padding: float = 1.25,
        shift_heatmap: bool = True,
        dark_kernel: int = 11,
        normalize_on_cpu: bool = True,
        crop_backend: str = "cv2",
        crop_device: str | torch.device | None = None,
        crops_on_device: bool = False,
    ) -> None:
        normalize_decoder(decoder)  # fail early on a typo
        if crop_backend not in CROP_BACKENDS:
            raise ValueError(f"unknown crop backend {crop_backend!r}; choose one of {CROP_BACKENDS}")
        if crop_backend == "cv2" and (crops_on_device or (crop_device is not None and
                                                         torch.device(crop_device).type != "cpu")):
            raise ValueError("crop_backend='cv2' cuts crops on the CPU; crop_device/crops_on_device need 'torch'")
        if crop_device is None:
            crop_device = "cuda" if crop_backend == "torch" and torch.cuda.is_available() else "cpu"
        if torch.device(crop_device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"crop_device {crop_device!r}: no CUDA device here")
        self.crop_backend = crop_backend
        self.crop_device = torch.device(crop_device)
        self.crops_on_device = crops_on_device
        self.input_size_wh = (int(input_size_wh[0]), int(input_size_wh[1]))
        self.spec = spec
        self.flip_test = flip_test
        self.decoder = decoder
        self.padding = padding
        self.shift_heatmap = shift_heatmap
        self.dark_kernel = dark_kernel
        self.normalize_on_cpu = normalize_on_cpu
        self._aspect = self.input_size_wh[0] / self.input_size_wh[1]

    @property
    def heatmap_shape(self) -> tuple[int, int, int]:
        """(K, H/4, W/4): the network's output per crop."""
        return (self.spec.num_joints, self.input_size_wh[1] // 4, self.input_size_wh[0] // 4)

    def prepare(
        self,
        image_rgb: np.ndarray,
        boxes_xywh: np.ndarray | Sequence | None = None,
        box_scores: np.ndarray | Sequence | None = None,
    ) -> PreparedBatch:
        """Crop every box (bilinear affine warp, zero border) and normalise; ``None`` = whole image."""
        img = _check_image(image_rgb)
        height, width = img.shape[:2]
        boxes, scores = _check_boxes(boxes_xywh, box_scores, width, height)
        centers = np.zeros((len(boxes), 2), np.float32)
        scales = np.zeros((len(boxes), 2), np.float32)
        for i, box in enumerate(boxes):
            centers[i], scales[i] = box_to_center_scale(box, self._aspect, self.padding)
        return self._crop(img, centers, scales, boxes, scores)

    def prepare_center_scale(
        self, image_rgb: np.ndarray, centers: np.ndarray, scales: np.ndarray, box_scores: np.ndarray | None = None
    ) -> PreparedBatch:
        """Crop persons given as mmpose centres [N, 2] and scales [N, 2] (the datasets' records).

        Their ``boxes_xywh`` are the unpadded boxes those crops stand for."""
        img = _check_image(image_rgb)
        centers = np.asarray(centers, np.float32).reshape(-1, 2)
        scales = np.asarray(scales, np.float32).reshape(-1, 2)
        sizes = scales * PIXEL_STD / self.padding
        boxes = np.concatenate([centers - sizes / 2, sizes], axis=1).astype(np.float32)
        scores = np.ones(len(centers), np.float32) if box_scores is None else np.asarray(box_scores, np.float32)
        return self._crop(img, centers, scales, boxes, scores)

    def _crop(
        self, img: np.ndarray, centers: np.ndarray, scales: np.ndarray, boxes: np.ndarray, scores: np.ndarray
    ) -> PreparedBatch:
        if self.crop_backend == "torch":
            return PreparedBatch(self._torch_crops(img, centers, scales), centers, scales, boxes, scores,
                                 self.flip_test)
        n = len(centers)
        in_w, in_h = self.input_size_wh
        copies = 2 if self.flip_test else 1
        raw = np.empty((copies * n, in_h, in_w, 3), np.uint8)
        for i in range(n):
            mat = get_affine_transform(centers[i], scales[i], 0.0, self.input_size_wh)
            cv2.warpAffine(img, mat, (in_w, in_h), dst=raw[i], flags=cv2.INTER_LINEAR)
            if copies == 2:  # mirrored crop for the flip test (cv2.flip: ~70x faster than numpy's ::-1)
                cv2.flip(raw[i], 1, dst=raw[n + i])
        if not self.normalize_on_cpu:
            return PreparedBatch(torch.from_numpy(raw), centers, scales, boxes, scores, self.flip_test)
        # one pass HWC uint8 -> CHW float32, then the ImageNet normalisation in place
        return PreparedBatch(normalize_crops(torch.from_numpy(raw)), centers, scales, boxes, scores, self.flip_test)

    def _torch_crops(self, img: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> torch.Tensor:
        """The crops of :meth:`_crop` cut on ``crop_device``: [P or 2P, 3, H, W] float32 normalised, or
        uint8 [.., H, W, 3] with ``normalize_on_cpu=False``; same normalisation ops as the cv2 path."""
        device = self.crop_device
        grey = warp_crops(image_to_device(img, device), crop_matrices(centers, scales, self.input_size_wh),
                          self.input_size_wh, flip=self.flip_test)  # whole grey levels, float32 NCHW
        if self.normalize_on_cpu:
            crops = grey.mul_(NORM_SCALE.to(device)).add_(NORM_SHIFT.to(device))
        else:
            crops = grey.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        return crops if self.crops_on_device else crops.to("cpu")

    def finish(self, prepared: PreparedBatch, heatmaps: torch.Tensor | np.ndarray) -> list[PersonPose]:
        """Merge flip-test heatmaps, decode to image pixels and rescore persons like mmpose's evaluation."""
        n = prepared.num_persons
        if isinstance(heatmaps, torch.Tensor):
            heatmaps = heatmaps.detach().to("cpu", torch.float32).numpy()
        heatmaps = np.asarray(heatmaps, dtype=np.float32)
        expected = n * (2 if prepared.flip else 1)
        if heatmaps.ndim != 4 or len(heatmaps) != expected or heatmaps.shape[1] != self.spec.num_joints:
            raise ValueError(
                f"expected heatmaps [{expected}, {self.spec.num_joints}, H, W], got {heatmaps.shape}"
            )
        if n == 0:
            return []
        if prepared.flip:
            heatmaps = flip_test_merge(heatmaps[:n], heatmaps[n:], self.spec.flip_pairs, self.shift_heatmap)
        coords, maxvals = decode_heatmaps(
            heatmaps, prepared.centers, prepared.scales, self.decoder, self.dark_kernel
        )
        keypoints = np.concatenate([coords, maxvals[..., None]], axis=-1).astype(np.float32)
        valid = maxvals > VIS_THR
        counts = valid.sum(1)
        kpt_score = np.where(counts > 0, (maxvals * valid).sum(1) / np.maximum(counts, 1), 0.0)
        person_scores = (kpt_score * prepared.box_scores).tolist()
        areas = (prepared.scales.astype(np.float64) * PIXEL_STD).prod(1).tolist()
        return [
            PersonPose(prepared.boxes_xywh[i].copy(), person_scores[i], keypoints[i], areas[i])
            for i in range(n)
        ]


def oks_nms(persons: Sequence[PersonPose], thr: float = 0.9, sigmas: Sequence[float] | None = None) -> list[PersonPose]:
    """Drop persons whose OKS with a better-scored person exceeds ``thr`` (mmpose's COCO setting: 0.9)."""
    if not persons:
        return []
    kpts = np.stack([p.keypoints for p in persons])
    if sigmas is None:
        sigmas = COCO.sigmas if kpts.shape[1] == COCO.num_joints else None
    if sigmas is None:
        raise ValueError(f"no default OKS sigmas for {kpts.shape[1]} joints; pass sigmas")
    areas = [p.area if p.area > 0 else float(p.bbox_xywh[2] * p.bbox_xywh[3]) for p in persons]
    keep = oks_nms_indices(kpts, [p.score for p in persons], areas, thr, sigmas)
    return [persons[i] for i in keep]


def infer_in_batches(
    infer: Callable[[torch.Tensor], torch.Tensor],
    crops: torch.Tensor,
    batch_size: int,
    heatmap_shape: tuple[int, int, int],
) -> torch.Tensor:
    """Heatmaps [P, K, H/4, W/4] (fp32, CPU) of crops [P, 3, H, W], ``batch_size`` crops per call.

    The one batched inference loop: the estimator, the evaluation loop and the jobs use it.
    ``heatmap_shape`` (K, H/4, W/4) shapes the empty answer for zero crops."""
    if len(crops) == 0:
        return torch.zeros(0, *heatmap_shape)
    with torch.inference_mode():
        parts = [infer(crops[i : i + batch_size]) for i in range(0, len(crops), batch_size)]
        return torch.cat([torch.as_tensor(p).to("cpu", torch.float32) for p in parts])


def module_infer(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a heatmap network as an ``infer`` callable: eval mode, its device and dtype, no autograd."""
    module.eval()
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    def infer(crops: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if crops.dtype == torch.uint8:  # normalisation left to the device
                crops = normalize_crops(crops.to(device))
            return module(crops.to(device=device, dtype=dtype))

    return infer


class PoseEstimator:
    """prepare -> infer (in chunks) -> finish, with an optional person detector in front."""

    def __init__(
        self,
        infer: Callable[[torch.Tensor], torch.Tensor] | torch.nn.Module,
        pipeline: TopDownPipeline | None = None,
        detector: object | None = None,
        batch_size: int = 32,
        nms_thr: float | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.infer = module_infer(infer) if isinstance(infer, torch.nn.Module) else infer
        self.pipeline = pipeline or TopDownPipeline()
        self.detector = detector
        self.batch_size = batch_size
        self.nms_thr = nms_thr

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "cpu",
        flip_test: bool = True,
        decoder: str = "default",
        detector: object | None = None,
        batch_size: int = 32,
    ) -> PoseEstimator:
        """Load one of our (or the authors') checkpoints; input size and joints come from its metadata."""
        from ditepose.model.checkpoint import load_pose_model
        from ditepose.model.keypoints import spec_for_checkpoint

        module, meta = load_pose_model(path, map_location=device)
        spec = spec_for_checkpoint(meta.dataset, meta.num_joints)
        pipeline = TopDownPipeline(meta.input_size, spec, flip_test=flip_test, decoder=decoder)
        return cls(module, pipeline, detector=detector, batch_size=batch_size)

    @property
    def spec(self) -> KeypointSpec:
        return self.pipeline.spec

    def run_network(self, crops: torch.Tensor) -> torch.Tensor:
        """Heatmaps for all crops, ``batch_size`` at a time, on the CPU."""
        return infer_in_batches(self.infer, crops, self.batch_size, self.pipeline.heatmap_shape)

    def predict(
        self,
        image_rgb: np.ndarray,
        boxes: np.ndarray | Sequence | None = None,
        box_scores: np.ndarray | Sequence | None = None,
    ) -> list[PersonPose]:
        """Poses of the persons in ``boxes`` (xywh); without boxes, the detector's or the whole image."""
        if boxes is None and self.detector is not None:
            boxes, box_scores = self.detector.detect(_check_image(image_rgb))  # type: ignore[attr-defined]
        prepared = self.pipeline.prepare(image_rgb, boxes, box_scores)
        persons = self.pipeline.finish(prepared, self.run_network(prepared.crops))
        if self.nms_thr is not None:
            persons = oks_nms(persons, self.nms_thr, self.spec.sigmas)
        return persons
