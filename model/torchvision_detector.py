"""torchvision COCO detectors as person detectors (a weights file on disk; see the class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ditepose.model.detectors import _empty

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
