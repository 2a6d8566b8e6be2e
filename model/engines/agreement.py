"""Precision agreement: is an engine's answer the fp32 torch engine's answer, joint by joint?

An engine that runs in lower precision (bf16 in OpenVINO or torch autocast) or on another runtime
can move keypoints without any error being raised. AP cannot judge that on an untrained or a
demo checkpoint (its AP is noise either way), so before an engine serves it is run beside the fp32
torch engine on fixed inputs and compared where users see the difference: in decoded keypoints.

The fixed inputs are :data:`REFERENCE_FILE`, shipped with the package: five people from
``docs/riders.jpg`` and ``docs/example.jpg`` (boxes found by NanoDet, pinned in
:data:`REFERENCE_PEOPLE`), cut by the pipeline's own affine crop as 384x384 squares and stored as
JPEG bytes. :func:`reference_crops` turns them into any input size a model takes: each person at
two paddings (1.25, the pipeline's, and 1.5), centre-cropped to the input's aspect, resized,
ImageNet-normalised, plus the mirrored copies the flip test sends (20 crops in all).

The verdict (:class:`AgreementBounds`): a joint *moved* when its decoded position (the pipeline's
default decoder, in input pixels) is more than ``shift_px`` from the reference's; the candidate is
refused when more than ``max_moved_share`` of all (crop, joint) pairs moved. The report also gives
the heatmap max-abs error and the p50/p99 pixel error of each joint.

To rebuild the shipped crops (only if the boxes or the crop code change)::

    python -c "from ditepose.model.engines.agreement import write_reference_crops as w; w('docs')"
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ditepose.model.codec import decode_heatmaps
from ditepose.model.pipeline import TopDownPipeline, normalize_crops
from ditepose.model.transforms import PIXEL_STD

REFERENCE_FILE = Path(__file__).with_name("reference_crops.pt")
# (image under docs/, person box x, y, w, h in pixels): NanoDet's boxes at score >= 0.35
REFERENCE_PEOPLE: tuple[tuple[str, tuple[float, float, float, float]], ...] = (
    ("riders.jpg", (238.9, 128.6, 76.7, 116.2)),
    ("riders.jpg", (360.8, 113.1, 62.3, 126.8)),
    ("riders.jpg", (328.8, 115.6, 123.5, 132.5)),
    ("example.jpg", (192.6, 30.8, 136.4, 207.2)),
    ("example.jpg", (4.5, 45.2, 269.6, 197.8)),
)
STORED_SIZE = 384  # square crops, enough pixels for inputs up to 384x288 without upsampling
STORED_PADDING = 1.5  # box padding of the stored square; the views below crop inside it
VIEW_PADDINGS = (1.25, 1.5)
JPEG_QUALITY = 95

Infer = Callable[[torch.Tensor], torch.Tensor]


def write_reference_crops(docs_dir: str | Path, path: str | Path = REFERENCE_FILE) -> Path:
    """Cut :data:`REFERENCE_PEOPLE` from ``docs_dir`` and save them as JPEG bytes in ``path``."""
    pipeline = TopDownPipeline((STORED_SIZE, STORED_SIZE), flip_test=False, padding=STORED_PADDING,
                               normalize_on_cpu=False)
    encoded = []
    for image_name, box in REFERENCE_PEOPLE:
        bgr = cv2.imread(str(Path(docs_dir) / image_name), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read {Path(docs_dir) / image_name}")
        crop_rgb = pipeline.prepare(np.ascontiguousarray(bgr[..., ::-1]), [box]).crops[0].numpy()
        ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(crop_rgb[..., ::-1]),
                                [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"JPEG encoding of the crop of {image_name} failed")
        encoded.append(torch.from_numpy(jpeg.reshape(-1).copy()))
    target = Path(path)
    torch.save({"jpeg": encoded, "people": [list(p) for p in REFERENCE_PEOPLE], "size": STORED_SIZE,
                "padding": STORED_PADDING}, target)
    return target


def _stored_crops(path: Path = REFERENCE_FILE) -> list[np.ndarray]:
    """The shipped squares, uint8 RGB [S, S, 3] each."""
    stored = torch.load(path, weights_only=True)
    crops = []
    for jpeg in stored["jpeg"]:
        bgr = cv2.imdecode(jpeg.numpy(), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{path}: a reference crop is not a readable JPEG")
        crops.append(np.ascontiguousarray(bgr[..., ::-1]))
    return crops


def _view(square: np.ndarray, padding: float, input_hw: tuple[int, int]) -> np.ndarray:
    """The part of a stored square that a box padded by ``padding`` at ``input_hw``'s aspect covers."""
    height, width = input_hw
    side = square.shape[0] * padding / STORED_PADDING  # the padded box's longer side in stored pixels
    box_h = side if height >= width else side * height / width
    box_w = side if width >= height else side * width / height
    centre = square.shape[0] / 2
    matrix = np.array([[width / box_w, 0, width / 2 - centre * width / box_w],
                       [0, height / box_h, height / 2 - centre * height / box_h]], np.float32)
    return cv2.warpAffine(square, matrix, (width, height), flags=cv2.INTER_LINEAR)


def reference_crops(input_hw: tuple[int, int] = (256, 192), flip: bool = True,
                    path: Path = REFERENCE_FILE) -> torch.Tensor:
    """The fixed inputs at ``input_hw``: float32 [20, 3, H, W] normalised (10 with ``flip=False``)."""
    views = [_view(square, padding, input_hw) for square in _stored_crops(path) for padding in VIEW_PADDINGS]
    if flip:
        views += [np.ascontiguousarray(view[:, ::-1]) for view in views]
    return normalize_crops(torch.from_numpy(np.stack(views)))


def decode_to_input_px(heatmaps: torch.Tensor | np.ndarray,
                       input_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps [N, K, h, w] -> keypoints [N, K, 2] in input pixels and scores [N, K] (default decoder)."""
    maps = np.asarray(heatmaps.detach().float().cpu().numpy() if isinstance(heatmaps, torch.Tensor) else heatmaps,
                      np.float32)
    height, width = input_hw
    count = len(maps)
    centre = np.tile(np.array([[width / 2, height / 2]], np.float32), (count, 1))
    scale = np.tile(np.array([[width / PIXEL_STD, height / PIXEL_STD]], np.float32), (count, 1))
    return decode_heatmaps(maps, centre, scale, "default")


@dataclass(frozen=True)
class AgreementBounds:
    """When a candidate is refused: more than ``max_moved_share`` of all joints moved more than
    ``shift_px`` input pixels. 4 px is one heatmap cell at the stride 4 of Dite-HRNet; 5% of the 340
    joints of the 256x192 reference set is 17 joints (one whole person)."""

    shift_px: float = 4.0
    max_moved_share: float = 0.05

    def __post_init__(self) -> None:
        if not self.shift_px > 0 or not 0 <= self.max_moved_share <= 1:
            raise ValueError(f"bounds need shift_px > 0 and 0 <= max_moved_share <= 1, got {self}")


@dataclass(frozen=True)
class AgreementReport:
    """How far a candidate engine's answers are from the fp32 torch engine's on the same crops."""

    label: str
    input_hw: tuple[int, int]
    crops: int
    heatmap_max_abs: float  # max |candidate - reference| over every heatmap value
    heatmap_peak: float  # max |reference|: the scale the error is read against
    joint_p50_px: tuple[float, ...]  # per joint, over the crops
    joint_p99_px: tuple[float, ...]
    max_px: float
    moved: int  # (crop, joint) pairs further than bounds.shift_px
    bounds: AgreementBounds = field(default_factory=AgreementBounds)

    @property
    def joints(self) -> int:
        """(crop, joint) pairs compared."""
        return self.crops * len(self.joint_p50_px)

    @property
    def moved_share(self) -> float:
        return self.moved / self.joints if self.joints else float("nan")

    @property
    def passed(self) -> bool:
        """Within the bounds; a non-finite heatmap error (NaN output) never passes."""
        finite = math.isfinite(self.heatmap_max_abs) and math.isfinite(self.max_px)
        return finite and self.moved_share <= self.bounds.max_moved_share + 1e-12

    def verdict(self) -> str:
        """One line: accepted, or refused with the reason."""
        height, width = self.input_hw
        summary = (f"{self.moved} of {self.joints} joints ({self.moved_share:.1%}) moved more than "
                   f"{self.bounds.shift_px:g} px from the fp32 torch engine on the {self.crops} reference crops "
                   f"at {width}x{height} (p99 {max(self.joint_p99_px, default=0.0):.2f} px, max {self.max_px:.2f} px, "
                   f"heatmap max-abs error {self.heatmap_max_abs:.3g} of peak {self.heatmap_peak:.3g})")
        if self.passed:
            return f"accepted: {self.label}: {summary}"
        remedy = ("Serve the torch engine (engine='torch')." if self.label.endswith("fp32")
                  else "Serve it in fp32 (precision='fp32').")
        return f"refused: {self.label}: {summary}; the limit is {self.bounds.max_moved_share:.1%}. {remedy}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN/inf become null)."""

        def clean(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "label": self.label, "passed": self.passed, "input_hw": list(self.input_hw), "crops": self.crops,
            "heatmap_max_abs": clean(self.heatmap_max_abs), "heatmap_peak": clean(self.heatmap_peak),
            "joint_p50_px": [clean(v) for v in self.joint_p50_px],
            "joint_p99_px": [clean(v) for v in self.joint_p99_px], "max_px": clean(self.max_px),
            "moved": self.moved, "joints": self.joints, "moved_share": clean(self.moved_share),
            "shift_px": self.bounds.shift_px, "max_moved_share": self.bounds.max_moved_share,
            "verdict": self.verdict(),
        }


class AgreementRefused(ValueError):
    """An engine disagrees with the fp32 torch engine beyond the bounds; ``report`` says how."""

    def __init__(self, report: AgreementReport) -> None:
        super().__init__(report.verdict())
        self.report = report


def _as_numpy(heatmaps: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(heatmaps, torch.Tensor):
        return heatmaps.detach().to("cpu", torch.float32).numpy()
    return np.asarray(heatmaps, np.float32)


def compare_heatmaps(reference: torch.Tensor | np.ndarray, candidate: torch.Tensor | np.ndarray,
                     input_hw: tuple[int, int], label: str = "candidate",
                     bounds: AgreementBounds | None = None) -> AgreementReport:
    """The agreement report of ``candidate`` heatmaps against ``reference`` ones (same crops)."""
    ref, got = _as_numpy(reference), _as_numpy(candidate)
    if ref.shape != got.shape or ref.ndim != 4:
        raise ValueError(f"heatmaps to compare must be [N, K, h, w] of one shape, got {ref.shape} and {got.shape}")
    bounds = bounds or AgreementBounds()
    ref_xy, _ = decode_to_input_px(ref, input_hw)
    got_xy, _ = decode_to_input_px(got, input_hw)
    error = np.linalg.norm(got_xy.astype(np.float64) - ref_xy, axis=-1)  # [N, K]
    error = np.where(np.isfinite(error), error, np.inf)
    diff = np.abs(got.astype(np.float64) - ref)
    return AgreementReport(
        label=label, input_hw=(int(input_hw[0]), int(input_hw[1])), crops=len(ref),
        heatmap_max_abs=float(diff.max()) if np.isfinite(diff).all() else float("nan"),
        heatmap_peak=float(np.abs(ref).max()),
        joint_p50_px=tuple(float(v) for v in np.percentile(error, 50, axis=0)),
        joint_p99_px=tuple(float(v) for v in np.percentile(error, 99, axis=0)),
        max_px=float(error.max()), moved=int((error > bounds.shift_px).sum()), bounds=bounds,
    )


def check_agreement(candidate: Infer, reference: Infer, input_hw: tuple[int, int] = (256, 192),
                    label: str = "candidate", bounds: AgreementBounds | None = None,
                    crops: torch.Tensor | None = None) -> AgreementReport:
    """Run both engines on the reference crops (or ``crops``) and compare (:func:`compare_heatmaps`).

    ``reference`` is the fp32 torch engine of the same module (:func:`torch_fp32_reference`)."""
    inputs = reference_crops(input_hw) if crops is None else crops
    with torch.inference_mode():
        expected = reference(inputs.clone())
        got = candidate(inputs.clone())
    return compare_heatmaps(expected, got, (int(inputs.shape[-2]), int(inputs.shape[-1])), label, bounds)


def require_agreement(report: AgreementReport) -> AgreementReport:
    """``report`` when it passed, else :class:`AgreementRefused` with its verdict."""
    if not report.passed:
        raise AgreementRefused(report)
    return report


def torch_fp32_reference(module: torch.nn.Module) -> Infer:
    """The reference every candidate is held to: the fp32 torch engine of ``module`` on the CPU."""
    from ditepose.model.engines.torch_engine import InferenceEngine

    return InferenceEngine(module, "cpu", precision="fp32")


def per_joint_table(report: AgreementReport, joint_names: Sequence[str] | None = None) -> str:
    """p50/p99 pixel error per joint, one line each (for CLIs and logs)."""
    names = list(joint_names or [f"joint {k}" for k in range(len(report.joint_p50_px))])
    width = max(len(n) for n in names) + 2
    lines = [f"{'':<{width}}{'p50 px':>8}{'p99 px':>8}"]
    lines += [f"{name:<{width}}{p50:>8.2f}{p99:>8.2f}"
              for name, p50, p99 in zip(names, report.joint_p50_px, report.joint_p99_px, strict=True)]
    return "\n".join(lines)
