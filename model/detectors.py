"""Person detectors that feed boxes to the top-down pipeline.

All of them run offline: nothing is downloaded at run time. ``NanoDetDetector`` (the default
when its weights are cached: ``ditepose weights fetch``) is a real COCO person detector;
``TorchvisionDetector`` needs a weights file on disk; ``HogPersonDetector`` uses OpenCV's
built-in people SVM (in OpenCV 5 it ships with ``opencv-contrib-python-headless``).

Every detector answers ``detect(image_rgb) -> (boxes [N, 4] xywh float32 in image pixels,
scores [N] float32)``, best first, at most ``max_persons``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol, get_args, runtime_checkable

import numpy as np


@runtime_checkable
class PersonDetector(Protocol):
    """``detect(image_rgb uint8 HxWx3) -> (boxes_xywh float32 [N, 4], scores float32 [N])``."""

    def detect(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)


def box_nms(boxes_xywh: np.ndarray, scores: np.ndarray, iou_thr: float) -> np.ndarray:
    """Greedy IoU non-maximum suppression; indices kept, best score first."""
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    x1, y1 = boxes[:, 0], boxes[:, 1]
    x2, y2 = x1 + boxes[:, 2], y1 + boxes[:, 3]
    area = boxes[:, 2] * boxes[:, 3]
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(int(i))
        iw = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = iw * ih
        iou = inter / np.maximum(area[i] + area[rest] - inter, 1e-9)
        order = rest[iou <= iou_thr]
    return np.asarray(keep, dtype=np.int64)


class WholeImageDetector:
    """One box covering the whole image (mmpose's behaviour without person results)."""

    def detect(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        height, width = np.asarray(image_rgb).shape[:2]
        return np.array([[0, 0, width, height]], np.float32), np.ones(1, np.float32)


class HogPersonDetector:
    """OpenCV's HOG + linear SVM people detector (Dalal-Triggs), multi-scale, then IoU-NMS.

    Weak but dependency-free: useful as a fallback when no CNN detector weights exist.
    Images are shrunk to ``max_side`` first for speed; HOG's 64x128 window limits it to
    people at least ~128 px tall at that size.
    """

    def __init__(
        self,
        score_thr: float = 0.3,
        nms_iou: float = 0.45,
        max_side: int = 640,
        win_stride: int = 8,
        scale_step: float = 1.05,
    ) -> None:
        import cv2

        if not hasattr(cv2, "HOGDescriptor"):
            raise RuntimeError(
                f"OpenCV {cv2.__version__} has no HOGDescriptor (OpenCV 5 moved it to the contrib build); "
                "install opencv-contrib-python-headless"
            )
        self._hog = cv2.HOGDescriptor()
        self._hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        self.score_thr = score_thr
        self.nms_iou = nms_iou
        self.max_side = max_side
        self.win_stride = win_stride
        self.scale_step = scale_step

    def detect(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        img = np.asarray(image_rgb)
        if img.ndim != 3 or img.dtype != np.uint8:
            raise ValueError(f"image must be uint8 HxWx3, got {img.dtype} {img.shape}")
        height, width = img.shape[:2]
        factor = min(1.0, self.max_side / max(height, width))
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        if factor < 1.0:
            gray = cv2.resize(gray, (round(width * factor), round(height * factor)), interpolation=cv2.INTER_AREA)
        if gray.shape[0] < 128 or gray.shape[1] < 64:
            return _empty()
        stride = (self.win_stride, self.win_stride)
        rects, weights = self._hog.detectMultiScale(gray, winStride=stride, padding=(8, 8), scale=self.scale_step)
        if len(rects) == 0:
            return _empty()
        boxes = np.asarray(rects, np.float32).reshape(-1, 4) / factor
        scores = np.asarray(weights, np.float32).reshape(-1)
        ok = scores >= self.score_thr
        boxes, scores = boxes[ok], scores[ok]
        keep = box_nms(boxes, scores, self.nms_iou)
        boxes, scores = boxes[keep], scores[keep]
        # clip to the image
        x1 = np.clip(boxes[:, 0], 0, width)
        y1 = np.clip(boxes[:, 1], 0, height)
        x2 = np.clip(boxes[:, 0] + boxes[:, 2], 0, width)
        y2 = np.clip(boxes[:, 1] + boxes[:, 3], 0, height)
        out = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1).astype(np.float32)
        valid = (out[:, 2] > 1) & (out[:, 3] > 1)
        return out[valid], scores[valid].astype(np.float32)


TORCHVISION_ARCHS = (
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
)
COCO_PERSON_LABEL = 1


def _load_state_dict(path: Path) -> dict:
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(obj).__name__}")
    return obj


class TorchvisionDetector:
    """A torchvision COCO detector built offline (no weight download) from a local weights file."""

    def __init__(
        self,
        weights_path: str | Path,
        arch: str = "fasterrcnn_mobilenet_v3_large_fpn",
        score_thr: float = 0.5,
        device: str = "cpu",
        num_classes: int = 91,
    ) -> None:
        import torch
        from torchvision.models import detection

        if arch not in TORCHVISION_ARCHS:
            raise ValueError(f"unknown detector arch {arch!r}; choose one of {TORCHVISION_ARCHS}")
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"detector weights not found: {path} (torchvision {arch} state_dict)")
        model = getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=num_classes)
        model.load_state_dict(_load_state_dict(path))
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.arch = arch
        self.score_thr = score_thr

    def detect(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        img = np.asarray(image_rgb)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image must be uint8 HxWx3, got {img.dtype} {img.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
        with torch.inference_mode():
            out = self.model([tensor.to(self.device)])[0]
        keep = (out["labels"] == COCO_PERSON_LABEL) & (out["scores"] >= self.score_thr)
        xyxy = out["boxes"][keep].cpu().numpy().astype(np.float32)
        scores = out["scores"][keep].cpu().numpy().astype(np.float32)
        boxes = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1) if len(xyxy) else _empty()[0]
        return boxes.astype(np.float32), scores


class NanoDetDetector:
    """NanoDet (:mod:`ditepose.model.nanodet`) on one image or a batch: stretch to 416x416, GFL
    decode of the person class, IoU-NMS, a score threshold and a cap on persons.

    The default threshold 0.3 is where, on coco-mini val, it finds 43 of the 57 clearly visible
    people (recall 0.754 at IoU 0.5) with 0.71 false positives per image (``bench/detector.py``)."""

    def __init__(self, score_thr: float = 0.3, nms_iou: float = 0.6, max_persons: int = 100,
                 weights_dir: Path | None = None, device: str = "cpu") -> None:
        import torch

        from ditepose.model.nanodet import build_nanodet
        from ditepose.model.weight_store import NANODET, locate

        files = locate(NANODET, weights_dir)
        self.device = torch.device(device)
        self.model = build_nanodet(files["nanodet.json"], files["nanodet.bin"]).to(self.device)
        self.score_thr, self.nms_iou, self.max_persons = score_thr, nms_iou, max_persons

    def detect(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.detect_batch([image_rgb])[0]

    def detect_batch(self, images_rgb: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One forward pass for all images; per image (boxes xywh [N, 4], scores [N])."""
        import torch

        from ditepose.model.nanodet import INPUT_SIZE, PERSON, decode_boxes, preprocess

        if not images_rgb:
            return []
        for img in images_rgb:
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"image must be uint8 HxWx3, got {img.dtype} {img.shape}")
        batch = torch.cat([preprocess(img) for img in images_rgb]).to(self.device)
        with torch.inference_mode():
            boxes, scores = decode_boxes(tuple(o.cpu() for o in self.model(batch)))
        return [self._persons(b, s[:, PERSON], img.shape[1] / INPUT_SIZE, img.shape[0] / INPUT_SIZE)
                for b, s, img in zip(boxes, scores, images_rgb, strict=True)]

    def _persons(self, boxes, scores, scale_x: float, scale_y: float) -> tuple[np.ndarray, np.ndarray]:
        from torchvision.ops import nms

        keep = scores > self.score_thr
        boxes, scores = boxes[keep], scores[keep]
        order = nms(boxes, scores, self.nms_iou)[: self.max_persons]
        xyxy = (boxes[order] * boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])).numpy()
        if not len(xyxy):
            return _empty()
        xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
        return xywh.astype(np.float32), scores[order].numpy().astype(np.float32)


# The one list of person detector names (REST, gRPC, CLIs).
DetectorName = Literal["nanodet", "whole", "hog", "torchvision"]
DETECTORS: tuple[str, ...] = get_args(DetectorName)


def build_detector(name: str, **kwargs: object) -> PersonDetector:
    """'nanodet' | 'whole' | 'hog' | 'torchvision' (needs ``weights_path=``); kwargs go to the constructor.

    'nanodet' raises :class:`~ditepose.model.weight_store.WeightsMissing` (naming the fetch command)
    when its weights are not cached."""
    key = name.lower()
    if key == "nanodet":
        return NanoDetDetector(**kwargs)  # type: ignore[arg-type]
    if key in ("whole", "none", "whole_image"):
        if kwargs:
            raise TypeError(f"the whole-image detector takes no options, got {sorted(kwargs)}")
        return WholeImageDetector()
    if key == "hog":
        return HogPersonDetector(**kwargs)  # type: ignore[arg-type]
    if key == "torchvision":
        if "weights_path" not in kwargs or kwargs["weights_path"] is None:
            raise ValueError("the torchvision detector needs weights_path=<state_dict file>")
        return TorchvisionDetector(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown detector {name!r}; choose one of {DETECTORS}")
