"""Person detectors that feed boxes to the top-down pipeline.

All of them run offline: nothing is downloaded at run time. ``NanoDetDetector`` (the default
when its weights are cached: ``ditepose weights fetch``) is a real COCO person detector;
``TorchvisionDetector`` needs a state-dict file or torchvision's cached weights (downloaded only when
its caller asks: :mod:`ditepose.model.torchvision_detector`); ``HogPersonDetector`` uses OpenCV's
built-in people SVM (in OpenCV 5 it ships with ``opencv-contrib-python-headless``).

Every detector answers ``detect(image_rgb) -> (boxes [N, 4] xywh float32 in image pixels,
scores [N] float32)``, best first, at most ``max_persons``.

CNN detectors are also a :class:`StagedDetector`: detection split where the device work begins,
so that the service's worker pool batches it across requests on the pose network's devices
(:meth:`~ditepose.service.batching.pool.WorkerPool.add_detector`)::

    preprocess(image)        -> input [1, 3, H, W]           caller's thread, CPU
    device_forward(device)   -> fn(input [N, 3, H, W]) -> candidates [N, K, 5]   worker, any device
    postprocess(cands, hw)   -> (boxes xywh [M, 4], scores [M])   caller's thread, CPU

Glossary: ``H, W`` the detector's fixed input size (``input_hw``); ``K`` candidates per image
(fixed per detector, padding rows have score -1); a candidate row is ``x1, y1, x2, y2, score``
in input pixels; :func:`input_to_image` is the one place input pixels become image pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol, get_args, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class PersonDetector(Protocol):
    """``detect(image_rgb uint8 HxWx3) -> (boxes_xywh float32 [N, 4], scores float32 [N])``."""

    def detect(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


DeviceForward = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class StagedDetector(PersonDetector, Protocol):
    """A detector in three stages (module docstring), so a worker pool can batch its device work."""

    name: str
    input_hw: tuple[int, int]

    def preprocess(self, image_rgb: np.ndarray) -> torch.Tensor:
        """uint8 RGB [H0, W0, 3] -> float32 [1, 3, H, W] (``input_hw``)."""
        ...

    def device_forward(self, device: str) -> DeviceForward:
        """The network on ``device``: input [N, 3, H, W] (any device) -> candidates [N, K, 5] on the CPU."""
        ...

    def postprocess(self, candidates: torch.Tensor, image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """One image's candidates [K, 5] -> (boxes xywh [M, 4] image px, scores [M]), best first."""
        ...


def detect_staged(detector: StagedDetector, images_rgb: list[np.ndarray], device: str = "cpu",
                  forward: DeviceForward | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The three stages for the whole list, with one forward pass: ``detector.device_forward(device)``
    in this thread, or ``forward`` (e.g. a worker pool's detector batcher)."""
    if not images_rgb:
        return []
    batch = torch.cat([detector.preprocess(check_image(img)) for img in images_rgb])
    candidates = (forward or detector.device_forward(device))(batch)
    return [detector.postprocess(c, img.shape[:2]) for c, img in zip(candidates, images_rgb, strict=True)]


def check_image(image_rgb: np.ndarray) -> np.ndarray:
    """``image_rgb`` if it is uint8 HxWx3, else ValueError naming what it is."""
    img = np.asarray(image_rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be uint8 HxWx3, got {img.dtype} {img.shape}")
    return img


def input_to_image(xyxy: np.ndarray, image_hw: tuple[int, int], input_hw: tuple[int, int],
                   letterbox: bool = False) -> np.ndarray:
    """Boxes x1, y1, x2, y2 [M, 4] in detector-input pixels -> xywh [M, 4] in image pixels, clipped.

    ``letterbox=False``: the image was stretched to ``input_hw``; ``True``: scaled by one factor
    to fit and padded right/bottom (the padding starts at the input's origin-far side)."""
    (h0, w0), (h, w) = image_hw, input_hw
    xyxy = np.asarray(xyxy, np.float32).reshape(-1, 4)
    if letterbox:
        factor = min(h / h0, w / w0)
        sx = sy = 1.0 / factor
    else:
        sx, sy = w0 / w, h0 / h
    out = xyxy * np.array([sx, sy, sx, sy], np.float32)
    out[:, 0::2] = out[:, 0::2].clip(0, w0)
    out[:, 1::2] = out[:, 1::2].clip(0, h0)
    return np.concatenate([out[:, :2], out[:, 2:] - out[:, :2]], axis=1).astype(np.float32)


def select_persons(candidates: torch.Tensor, score_thr: float, nms_iou: float,
                   max_persons: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates [K, 5] -> (x1, y1, x2, y2 [M, 4], scores [M]): above ``score_thr``, IoU-NMS, best
    ``max_persons``, best first."""
    from torchvision.ops import nms

    candidates = candidates.float().cpu()
    keep = candidates[:, 4] > score_thr
    boxes, scores = candidates[keep, :4], candidates[keep, 4]
    order = nms(boxes, scores, nms_iou)[:max_persons]
    return boxes[order].numpy(), scores[order].numpy().astype(np.float32)


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
        self._hog.setSVMDetector(np.asarray(cv2.HOGDescriptor.getDefaultPeopleDetector()))
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


class NanoDetDetector:
    """NanoDet (:mod:`ditepose.model.nanodet`) as a :class:`StagedDetector`: stretch to 416x416,
    GFL decode of the person class on the device, then a score threshold, IoU-NMS and a cap on
    persons.

    The default threshold 0.3 is where, on coco-mini val, it finds 44 of the 57 clearly visible
    people (recall 0.772 at IoU 0.5) with 0.71 false positives per image (``bench/detector.py``)."""

    name = "nanodet"

    def __init__(self, score_thr: float = 0.3, nms_iou: float = 0.6, max_persons: int = 100,
                 weights_dir: Path | None = None, device: str = "cpu") -> None:
        from ditepose.model.nanodet import INPUT_SIZE, build_nanodet
        from ditepose.model.weight_store import NANODET, locate

        files = locate(NANODET, weights_dir)
        self.device = device
        self.model = build_nanodet(files["nanodet.json"], files["nanodet.bin"])
        self._on_device: dict[str, torch.nn.Module] = {"cpu": self.model}
        self.input_hw = (INPUT_SIZE, INPUT_SIZE)
        self.score_thr, self.nms_iou, self.max_persons = score_thr, nms_iou, max_persons

    def preprocess(self, image_rgb: np.ndarray) -> torch.Tensor:
        from ditepose.model.nanodet import preprocess

        return preprocess(check_image(image_rgb))

    def device_forward(self, device: str) -> DeviceForward:
        import copy

        from ditepose.model.nanodet import PERSON, decode_boxes

        net = self._on_device.get(device)
        if net is None:
            net = self._on_device[device] = copy.deepcopy(self.model).to(device)
        target = torch.device(device)

        def forward(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                boxes, scores = decode_boxes(net(batch.to(target)))
                return torch.cat((boxes, scores[..., PERSON : PERSON + 1]), -1).cpu()

        return forward

    def postprocess(self, candidates: torch.Tensor, image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        xyxy, scores = select_persons(candidates, self.score_thr, self.nms_iou, self.max_persons)
        if not len(xyxy):
            return _empty()
        return input_to_image(xyxy, image_hw, self.input_hw), scores

    def detect(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.detect_batch([image_rgb])[0]

    def detect_batch(self, images_rgb: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One forward pass for all images; per image (boxes xywh [N, 4], scores [N])."""
        return detect_staged(self, images_rgb, self.device)


# The one list of person detector names (REST, gRPC, CLIs).
DetectorName = Literal["nanodet", "whole", "hog", "torchvision"]
DETECTORS: tuple[str, ...] = get_args(DetectorName)


def nanodet_backend(engine: str) -> str:
    """Where NanoDet's CPU forward runs for an engine setting: ``auto`` is OpenVINO where it is
    installed (CUDA devices keep the torch network either way), ``openvino`` is OpenVINO or
    :class:`~ditepose.model.engines.select.EngineRefused`, ``torch`` the torch network. NanoDet runs
    fp32 only, so no agreement gate applies (tests/model hold its boxes to the torch network's)."""
    from ditepose.model.engines.select import EngineRefused, openvino_missing
    from ditepose.model.engines.setting import parse_engine_setting

    if parse_engine_setting(engine) == "torch":
        return "torch"
    missing = openvino_missing()
    if missing is None:
        return "openvino"
    if engine == "openvino":
        raise EngineRefused(f"engine 'openvino' was asked for the NanoDet detector, but {missing}")
    return "torch"


def build_detector(name: str, **kwargs: object) -> PersonDetector:
    """'nanodet' | 'whole' | 'hog' | 'torchvision' (``arch=``, and ``weights=`` or ``weights_path=``);
    kwargs go to the constructor; 'nanodet' also takes ``engine=`` (auto | torch | openvino,
    :func:`nanodet_backend`; default torch).

    'nanodet' raises :class:`~ditepose.model.weight_store.WeightsMissing` (naming the fetch command)
    when its weights are not cached."""
    key = name.lower()
    if key == "nanodet":
        engine = str(kwargs.pop("engine", "torch"))
        if nanodet_backend(engine) == "openvino":
            from ditepose.model.engines.openvino_nanodet import OpenVinoNanoDetDetector

            return OpenVinoNanoDetDetector(**kwargs)  # type: ignore[arg-type]
        return NanoDetDetector(**kwargs)  # type: ignore[arg-type]
    if key in ("whole", "none", "whole_image"):
        if kwargs:
            raise TypeError(f"the whole-image detector takes no options, got {sorted(kwargs)}")
        return WholeImageDetector()
    if key == "hog":
        return HogPersonDetector(**kwargs)  # type: ignore[arg-type]
    if key == "torchvision":  # the constructor says what is missing (weights= or weights_path=)
        from ditepose.model.torchvision_detector import TorchvisionDetector

        return TorchvisionDetector(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown detector {name!r}; choose one of {DETECTORS}")
