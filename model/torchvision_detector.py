"""torchvision's COCO detectors as staged person detectors (:class:`TorchvisionDetector`).

Architectures (:data:`TORCHVISION_ARCHS`; COCO val2017 box mAP of torchvision's ``COCO_V1``
weights, all classes, from torchvision's weight metadata): ``fasterrcnn_mobilenet_v3_large_fpn``
(32.8), ``fasterrcnn_mobilenet_v3_large_320_fpn`` (22.8), ``fasterrcnn_resnet50_fpn`` (37.0),
``fasterrcnn_resnet50_fpn_v2`` (46.7), ``retinanet_resnet50_fpn`` (36.4),
``ssdlite320_mobilenet_v3_large`` (21.3). torchvision measured those at its own input sizes (shorter
side 800 for the FPN models); here each network sees one fixed letterboxed size, ``input_hw``
(default 320x320 for the two 320 models, 640x640 for the rest), so its numbers may differ.

Where the weights come from, one of:

- ``weights="DEFAULT"`` (or a member name such as ``"COCO_V1"``, the enum's full name
  ``"FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1"``, or the enum member itself): torchvision's
  weights API. The file lives in torch.hub's cache, ``$TORCH_HOME/hub/checkpoints/`` (default
  ``~/.cache/torch/hub/checkpoints/``). It is downloaded from download.pytorch.org only when it is
  not cached and the caller allows it (``download=True``, the default for named weights), or ahead
  of time with ``python -m ditepose.model.torchvision_detector fetch ARCH``; with
  ``download=False`` (what a server should pass) a missing file raises
  :class:`~ditepose.model.weight_store.WeightsMissing` naming the file and that command.
- ``weights_path=FILE``: a local state dict of the architecture (torchvision's own ``.pth`` file
  copied from another machine, or one saved by ``torch.save(model.state_dict())``, optionally under
  ``"state_dict"`` or ``"model"``). Nothing is downloaded.

Licences: torchvision's code is BSD-3-Clause. Its pre-trained detection weights were trained on
COCO; torchvision's documentation says pre-trained models may carry licences or terms derived
from their training data and leaves it to the user to check they may use them for their purpose
(COCO's annotations are CC BY 4.0, its images come from Flickr under their own terms). Nothing of
them ships with this repository.

The three stages (:class:`~ditepose.model.detectors.StagedDetector`): ``preprocess`` scales the
image by one factor to fit ``input_hw`` and pads right/bottom with the network's mean colour (which
the network's own normalisation turns into 0, the value torchvision pads a batch with), so images of
any size batch together; the network's internal resize is set to that same size, so it runs at
``input_hw`` and reports boxes in input pixels; ``device_forward`` keeps the person class (COCO
label 1) as ``K = detections_per_img`` rows (padding: score -1); ``postprocess`` applies
``score_thr``, IoU-NMS and ``max_persons`` and maps boxes back with
``input_to_image(..., letterbox=True)``. Candidates below the network's own score floor (0.05 for
Faster R-CNN and RetinaNet, 0.001 for SSDlite) or removed by its own per-class NMS never reach
``postprocess``.
"""

from __future__ import annotations

import argparse
import copy
import pickle
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ditepose.model.detectors import (
    DeviceForward,
    _empty,
    check_image,
    detect_staged,
    input_to_image,
    select_persons,
)
from ditepose.model.weight_store import WeightsMissing

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

TORCHVISION_ARCHS = (
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
)
SMALL_INPUT_ARCHS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large")
COCO_PERSON_LABEL = 1
FETCH_MODULE = "python -m ditepose.model.torchvision_detector"


def default_input_hw(arch: str) -> tuple[int, int]:
    """320x320 for the architectures trained at 320, 640x640 for the rest."""
    return (320, 320) if arch in SMALL_INPUT_ARCHS else (640, 640)


def _check_arch(arch: str) -> None:
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown torchvision detector arch {arch!r}; choose one of {TORCHVISION_ARCHS}")


def resolve_weights(arch: str, weights: str | WeightsEnum) -> WeightsEnum:
    """torchvision's weights enum member for ``arch``: from the member, its name ('DEFAULT',
    'COCO_V1') or the enum's full name; ValueError listing the choices otherwise."""
    from torchvision.models import WeightsEnum, get_model_weights

    _check_arch(arch)
    enum_cls = get_model_weights(arch)
    choices = list(enum_cls.__members__)  # the members and the DEFAULT alias
    if isinstance(weights, enum_cls):
        return weights
    if isinstance(weights, WeightsEnum):
        raise ValueError(f"{weights} are not weights of {arch}; choose one of {choices} of {enum_cls.__name__}")
    if isinstance(weights, str):
        prefix, _, member = weights.rpartition(".")
        if prefix in ("", enum_cls.__name__) and member in enum_cls.__members__:
            return enum_cls[member]
    raise ValueError(f"unknown weights {weights!r} for {arch}; choose one of {choices} of {enum_cls.__name__}")


def cache_path(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps the file of ``weights``: ``$TORCH_HOME/hub/checkpoints/<url's name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def _missing(arch: str, weights: WeightsEnum, path: Path, why: str) -> WeightsMissing:
    return WeightsMissing(
        f"torchvision {arch} weights {weights} not available ({why}); run `{FETCH_MODULE} fetch {arch}"
        f"{'' if weights is weights.__class__.DEFAULT else ' --weights ' + weights.name}` once where "
        f"download.pytorch.org is reachable (it writes {path}; set TORCH_HOME to move the cache), "
        f"put the file from {weights.url} at that path, or pass weights_path=<state dict file>"
    )


def fetch_weights(arch: str, weights: str | WeightsEnum = "DEFAULT", progress: bool = False) -> Path:
    """Download ``weights`` of ``arch`` into torch.hub's cache (a no-op when cached); the file's path.

    The download is checked against the hash prefix in the file name (as torch.hub does) and lands
    atomically; a failure raises :class:`WeightsMissing` with the cause."""
    enum = resolve_weights(arch, weights)
    path = cache_path(enum)
    if path.is_file():
        return path
    match = torch.hub.HASH_REGEX.search(path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(enum.url, str(path), match.group(1) if match else None, progress=progress)
    except (OSError, RuntimeError) as exc:  # URLError / HTTPError / no disk are OSErrors; a bad hash is a RuntimeError
        raise _missing(arch, enum, path, f"{path} is missing and downloading {enum.url} failed: {exc}") from exc
    return path


def _load_state_dict(path: Path, arch: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path}: not a loadable torch state dict for {arch}: {exc}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict for {arch}, got {type(obj).__name__}")
    return obj


def _detections_per_img(model: torch.nn.Module) -> int:
    """K: most detections per image (Faster R-CNN keeps it on its ROI heads, the others on the model)."""
    holder: Any = getattr(model, "roi_heads", model)  # torchvision's classes declare no common interface
    return int(holder.detections_per_img)


def _checked_options(arch: str, weights: str | WeightsEnum | None, weights_path: str | Path | None,
                     input_hw: tuple[int, int] | None, score_thr: float, nms_iou: float,
                     max_persons: int) -> tuple[int, int]:
    """ValueError for options the detector cannot run with; returns the input size (height, width)."""
    _check_arch(arch)
    if (weights is None) == (weights_path is None):
        raise ValueError(
            f"the torchvision detector {arch} needs exactly one of weights='DEFAULT' (torchvision's "
            f"weights API, cached under $TORCH_HOME) and weights_path=<state dict file>, "
            f"got weights={weights!r}, weights_path={weights_path!r}"
        )
    hw = tuple(input_hw) if input_hw is not None else default_input_hw(arch)
    if len(hw) != 2 or not all(isinstance(v, int) and v >= 32 for v in hw):
        raise ValueError(f"input_hw must be two integers >= 32 (height, width), got {input_hw!r}")
    if not 0.0 <= score_thr <= 1.0:
        raise ValueError(f"score_thr must lie in [0, 1] (padding rows score -1), got {score_thr}")
    if not 0.0 < nms_iou <= 1.0:
        raise ValueError(f"nms_iou must lie in (0, 1], got {nms_iou}")
    if max_persons < 1:
        raise ValueError(f"max_persons must be at least 1, got {max_persons}")
    return hw[0], hw[1]


def _network_from_torchvision(arch: str, weights: str | WeightsEnum, download: bool) -> tuple[Any, str]:
    """(model, where its weights came from) through torchvision's weights API and its cache."""
    from torchvision.models import detection

    enum = resolve_weights(arch, weights)
    path = cache_path(enum)
    if not path.is_file():
        if not download:
            raise _missing(arch, enum, path, f"{path} is missing and download=False")
        fetch_weights(arch, enum)
    try:  # from the cache just checked: torchvision builds the model as it does for its weights
        model = getattr(detection, arch)(weights=enum, progress=False)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise WeightsMissing(f"torchvision {arch} weights {enum}: the cached {path} cannot be "
                             f"loaded ({exc}); delete it and fetch it again") from exc
    return model, f"torchvision {enum} ({path})"


def _network_from_file(arch: str, path: Path, num_classes: int) -> tuple[Any, str]:
    """(model, where its weights came from) from a local state dict of ``arch``."""
    from torchvision.models import detection

    if not path.is_file():
        raise FileNotFoundError(f"detector weights not found: {path} (torchvision {arch} state dict)")
    model = getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=num_classes)
    try:
        model.load_state_dict(_load_state_dict(path, arch))
    except RuntimeError as exc:  # missing / unexpected keys, wrong shapes: another architecture
        raise ValueError(f"{path} is not a state dict of torchvision {arch} "
                         f"({num_classes} classes): {exc}") from exc
    return model, f"state dict {path}"


class TorchvisionDetector:
    """A torchvision COCO detector (module docstring) as a :class:`~ditepose.model.detectors.StagedDetector`.

    Exactly one of ``weights`` (torchvision's weights API, cached under ``$TORCH_HOME``) and
    ``weights_path`` (a local state dict) says where the weights come from; ``download=False``
    keeps ``weights`` to the cache. ``input_hw`` is the size the network runs at (default
    :func:`default_input_hw`). The detector's ``name`` carries the architecture and input size,
    because the worker pool keeps one detector per name and batches its inputs together; pass
    ``name=`` to serve two weight files of one architecture side by side.

    The default threshold 0.5 is the common choice for torchvision's detectors; it has not been
    measured on coco-mini here (the weights need a download this project's machines cannot make)."""

    def __init__(
        self,
        arch: str = "fasterrcnn_mobilenet_v3_large_fpn",
        *,
        weights: str | WeightsEnum | None = None,
        weights_path: str | Path | None = None,
        download: bool = True,
        input_hw: tuple[int, int] | None = None,
        score_thr: float = 0.5,
        nms_iou: float = 0.6,
        max_persons: int = 100,
        device: str = "cpu",
        num_classes: int = 91,
        name: str | None = None,
    ) -> None:
        hw = _checked_options(arch, weights, weights_path, input_hw, score_thr, nms_iou, max_persons)
        if weights is not None:
            model, self.source = _network_from_torchvision(arch, weights, download)
        else:
            assert weights_path is not None  # exactly one of the two (checked above)
            model, self.source = _network_from_file(arch, Path(weights_path), num_classes)
        h, w = hw
        transform = model.transform  # run at exactly input_hw: the resize becomes the identity
        transform.min_size, transform.max_size = (min(h, w),), max(h, w)
        if transform.fixed_size is not None:  # SSD: a fixed (width, height)
            transform.fixed_size = (w, h)
        self.model = model.eval()
        self.arch = arch
        self.input_hw: tuple[int, int] = (h, w)
        self.name = name or f"torchvision:{arch}@{h}x{w}"
        self.candidates_per_image = _detections_per_img(model)
        self.pad_rgb = torch.tensor(transform.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.score_thr, self.nms_iou, self.max_persons = score_thr, nms_iou, max_persons
        self.device = device
        self._on_device: dict[str, torch.nn.Module] = {"cpu": self.model}
        self._lock = threading.Lock()

    def preprocess(self, image_rgb: np.ndarray) -> torch.Tensor:
        """uint8 RGB [H0, W0, 3] -> float32 [1, 3, H, W] in [0, 1]: scaled by ``min(H/H0, W/W0)``
        (area-averaged when shrinking), at the top-left, the rest the network's mean colour."""
        import cv2

        img = np.ascontiguousarray(check_image(image_rgb))
        (h0, w0), (h, w) = img.shape[:2], self.input_hw
        factor = min(h / h0, w / w0)
        if factor != 1.0:
            interp = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR
            if round(h0 * factor) >= 1 and round(w0 * factor) >= 1:
                # fx = fy = factor: OpenCV maps pixels by exactly this factor, which input_to_image inverts
                img = cv2.resize(img, (0, 0), fx=factor, fy=factor, interpolation=interp)
            else:  # a sliver (e.g. 1 x 2000 px): keep one row or column
                img = cv2.resize(img, (max(1, round(w0 * factor)), max(1, round(h0 * factor))),
                                 interpolation=interp)
        img = np.ascontiguousarray(img[:h, :w])
        out = self.pad_rgb.expand(1, 3, h, w).clone()
        out[0, :, : img.shape[0], : img.shape[1]] = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
        return out

    def device_forward(self, device: str) -> DeviceForward:
        """The network on ``device`` (one copy per device, made on first use): input [N, 3, H, W] ->
        person candidates [N, K, 5] on the CPU, best first, padding rows (0, 0, 0, 0, -1)."""
        with self._lock:
            net = self._on_device.get(device)
            if net is None:
                net = self._on_device[device] = copy.deepcopy(self.model).to(device)
        target = torch.device(device)
        k = self.candidates_per_image

        def forward(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                outputs = net(list(batch.to(target, torch.float32)))
                rows = torch.zeros((len(outputs), k, 5), device=target)
                rows[..., 4] = -1.0
                for i, out in enumerate(outputs):
                    score = torch.where(out["labels"] == COCO_PERSON_LABEL, out["scores"], -1.0)
                    n = min(k, score.numel())
                    top = score.topk(n).indices  # persons first, best first; other classes score -1
                    rows[i, :n, 4] = score[top]
                    rows[i, :n, :4] = out["boxes"][top] * (score[top] >= 0).unsqueeze(1)
                return rows.cpu()

        return forward

    def postprocess(self, candidates: torch.Tensor, image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """One image's candidates [K, 5] -> (boxes xywh [M, 4] image px, scores [M]), best first;
        boxes left without a pixel of width or height once clipped to the image (padding) dropped."""
        xyxy, scores = select_persons(candidates, self.score_thr, self.nms_iou, self.max_persons)
        if not len(xyxy):
            return _empty()
        boxes = input_to_image(xyxy, image_hw, self.input_hw, letterbox=True)
        keep = (boxes[:, 2] >= 1.0) & (boxes[:, 3] >= 1.0)
        return boxes[keep], scores[keep]

    def detect(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.detect_batch([image_rgb])[0]

    def detect_batch(self, images_rgb: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One forward pass for all images (on ``device``); per image (boxes xywh [N, 4], scores [N])."""
        return detect_staged(self, images_rgb, self.device)


def main(argv: list[str] | None = None) -> int:
    """``fetch ARCH [--weights NAME]``: download into torch.hub's cache; ``status``: what is cached."""
    parser = argparse.ArgumentParser(
        prog=FETCH_MODULE, description="torchvision detector weights in torch.hub's cache ($TORCH_HOME)")
    sub = parser.add_subparsers(dest="action", required=True)
    fetch = sub.add_parser("fetch", help="download one architecture's weights (needs download.pytorch.org once)")
    fetch.add_argument("arch", choices=TORCHVISION_ARCHS)
    fetch.add_argument("--weights", default="DEFAULT", help="member of the arch's weights enum (default: DEFAULT)")
    sub.add_parser("status", help="list each architecture's default weights file and whether it is cached")
    args = parser.parse_args(argv)
    if args.action == "fetch":
        try:
            path = fetch_weights(args.arch, args.weights, progress=True)
        except (ValueError, WeightsMissing) as exc:
            print(f"error: {exc}")
            return 1
        print(f"{args.arch}: ready in {path} (torchvision {resolve_weights(args.arch, args.weights)}; "
              "code BSD-3-Clause, COCO-trained weights: see torchvision's note on pre-trained model licences)")
        return 0
    for arch in TORCHVISION_ARCHS:
        path = cache_path(resolve_weights(arch, "DEFAULT"))
        print(f"{arch}: {'ready' if path.is_file() else 'missing'}  ({path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
