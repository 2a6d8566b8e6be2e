"""Which person boxes an evaluation crops: one option, ``boxes``, for ``ditepose evaluate``,
``ditepose train --test-boxes`` and evaluation jobs (``POST /v1/evaluate``).

A top-down AP means little without the boxes it was measured on, so this module is the one place
that turns the option into a dataset, and every result says which boxes it used:

- ``gt``: the annotated person boxes (mmpose ``use_gt_bbox=True``; what periodic validation uses).
  Reads higher than either kind of detected boxes.
- ``detections``: a detections file ``[{image_id, bbox xywh, score, category_id}]`` -- the
  paper's protocol with ``COCO_val2017_detections_AP_H_56_person.json`` (``det_bbox_thr`` 0.0,
  the authors'); needs the file.
- ``detector``: a live person detector (default ``nanodet``, the service's default, at its own
  threshold 0.3) run over the images to be scored, in batches of images (``detect_batch``): what
  the served pipeline would crop. The result adds the detector's own report
  (:mod:`ditepose.training.detection_eval`).

MPII is always scored on its annotated centres and scales: ``boxes`` must be ``gt`` there.

The record. Results carry ``"box_source"``, one of::

    {"source": "gt"}
    {"source": "detections", "file": "<path>", "det_bbox_thr": 0.0}
    {"source": "detector", "detector": "nanodet", "score_thr": 0.3}

and, beside it, ``"boxes"``: the one-string label results carried before the record existed
(``"gt"``, ``"detections:<path>"``, now also ``"detector:<name>"``), kept so their readers keep
working. :func:`box_record` reads either form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from ditepose.model.detectors import DETECTORS, PersonDetector
from ditepose.training.config import TrainConfig
from ditepose.training.data_layout import find_split, resolve_det_file
from ditepose.training.datasets import CocoKeypointDataset, MpiiKeypointDataset, TopDownDataset
from ditepose.training.detection_eval import (
    DetectionRun,
    ImageRef,
    detection_report,
    detector_score_thr,
    run_detector,
)

BoxSourceName = Literal["gt", "detections", "detector"]
BOX_SOURCES: tuple[str, ...] = get_args(BoxSourceName)
DEFAULT_DETECTOR = "nanodet"  # the service's default detector (its 'auto' when the weights are cached)
DETECTOR_BATCH = 8  # images per detector forward pass (the service's det_max_batch_size)


@dataclass(frozen=True)
class BoxSource:
    """The ``boxes`` option, checked. ``score_thr``: boxes scoring below it are dropped -- for
    ``detections`` the authors' ``det_bbox_thr`` (None: 0.0), for ``detector`` the detector's own
    threshold (None: the detector's default, 0.3 for NanoDet)."""

    source: str = "gt"
    det_file: Path | None = None
    score_thr: float | None = None
    detector: str = DEFAULT_DETECTOR

    def __post_init__(self) -> None:
        if self.source not in BOX_SOURCES:
            raise ValueError(f"boxes must be one of {list(BOX_SOURCES)}, got {self.source!r}")
        if self.source == "detections" and self.det_file is None:
            raise ValueError("boxes 'detections' needs a detections file (det_file, --det-file)")
        if self.source != "detections" and self.det_file is not None:
            raise ValueError(f"a detections file (det_file, --det-file) is for boxes 'detections', not {self.source!r}")
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown detector {self.detector!r}; choose one of {list(DETECTORS)}")
        if self.score_thr is not None:
            if self.source == "gt":
                raise ValueError("a score threshold (det_score_thr, --det-score-thr) is for boxes 'detections' "
                                 "or 'detector', not 'gt'")
            if not math.isfinite(self.score_thr) or self.score_thr < 0:
                raise ValueError(f"det_score_thr must be a number >= 0, got {self.score_thr}")

    @classmethod
    def parse(cls, boxes: str | None = None, det_file: str | Path | None = None, detector: str | None = None,
              score_thr: float | None = None) -> BoxSource:
        """From options as the CLIs and requests give them. ``boxes`` None: ``detections`` when a
        detections file is given, else ``gt`` (what ``--det-file`` alone meant before ``boxes``)."""
        source = boxes or ("detections" if det_file is not None else "gt")
        if detector is not None and source != "detector":
            raise ValueError(f"a detector (detector, --detector) is for boxes 'detector', not {source!r}")
        return cls(source, Path(det_file) if det_file is not None else None, score_thr, detector or DEFAULT_DETECTOR)

    def record(self, detector_thr: float | None = None) -> dict[str, Any]:
        """The ``box_source`` record (module docstring); ``detector_thr``: the live detector's actual threshold."""
        if self.source == "gt":
            return {"source": "gt"}
        if self.source == "detections":
            return {"source": "detections", "file": str(self.det_file),
                    "det_bbox_thr": self.score_thr if self.score_thr is not None else 0.0}
        return {"source": "detector", "detector": self.detector,
                "score_thr": detector_thr if detector_thr is not None else self.score_thr}


def box_record(value: dict[str, Any] | str | None) -> dict[str, Any]:
    """A ``box_source`` record from either form a result may carry: the record itself, or the
    older ``"boxes"`` label (``"gt"``, ``"detections:<file>"``, ``"detector:<name>"``; None: gt)."""
    if isinstance(value, dict):
        if value.get("source") not in BOX_SOURCES:
            raise ValueError(f"not a box_source record: {value!r}")
        return dict(value)
    if value is None or value == "gt":
        return {"source": "gt"}
    if isinstance(value, str) and value.startswith("detections:"):
        return {"source": "detections", "file": value.removeprefix("detections:")}
    if isinstance(value, str) and value.startswith("detector:"):
        return {"source": "detector", "detector": value.removeprefix("detector:")}
    raise ValueError(f"not a boxes label or box_source record: {value!r}")


def box_label(record: dict[str, Any]) -> str:
    """The one-string ``"boxes"`` label of a record (for readers of results made before the record)."""
    source = record["source"]
    if source == "detections":
        return f"detections:{record['file']}"
    if source == "detector":
        return f"detector:{record['detector']}"
    return "gt"


def make_detector(source: BoxSource, device: str = "cpu", **options: object) -> PersonDetector:
    """The live detector of ``source``, offline: cached weights only (a missing file raises
    ``WeightsMissing``, a FileNotFoundError naming the fetch command). ``options`` go to the
    detector's constructor (``weights_dir`` for NanoDet; ``arch``, ``weights``/``weights_path``
    for torchvision, default its 'DEFAULT' weights from the cache)."""
    from ditepose.model.detectors import build_detector

    name = source.detector
    opts: dict[str, object] = dict(options)
    if source.score_thr is not None:
        if name == "whole":
            raise ValueError("detector 'whole' has no score threshold (it answers one box per image)")
        opts["score_thr"] = source.score_thr
    if name == "nanodet":
        opts["device"] = device
        if opts.get("weights_dir") is not None:
            opts["weights_dir"] = Path(str(opts["weights_dir"]))
    elif name == "torchvision":
        opts.setdefault("download", False)
        if "weights" not in opts and "weights_path" not in opts:
            opts["weights"] = "DEFAULT"
        opts["device"] = device
    try:
        return build_detector(name, **opts)
    except (TypeError, RuntimeError) as exc:  # e.g. OpenCV without HOG
        raise ValueError(f"detector {name!r} cannot run here: {exc}") from exc


@dataclass
class EvalSet:
    """An evaluation dataset and what its results must say about its boxes."""

    dataset: TopDownDataset
    gt_file: Path | None  # MPII PCKh ground truth
    box_source: dict[str, Any]
    detector_report: dict[str, Any] | None = None

    @property
    def boxes_label(self) -> str:
        return box_label(self.box_source)

    def describe(self) -> dict[str, Any]:
        """The keys every result adds: ``boxes`` (label), ``box_source`` (record), ``detector_report`` (detector only)."""
        out: dict[str, Any] = {"boxes": self.boxes_label, "box_source": self.box_source}
        if self.detector_report is not None:
            out["detector_report"] = self.detector_report
        return out


def evaluation_set(
    dataset_format: str,
    ann_file: str | Path,
    img_dir: str | Path,
    input_size_wh: tuple[int, int],
    boxes: BoxSource,
    *,
    gt_file: str | Path | None = None,
    max_images: int | None = None,
    max_people: int | None = None,
    detector: PersonDetector | None = None,
    device: str = "cpu",
    detector_options: dict[str, object] | None = None,
    detector_batch: int = DETECTOR_BATCH,
    between_batches: Callable[[], None] | None = None,
) -> EvalSet:
    """The evaluation-mode dataset of ``boxes`` (the one path of the CLI, the trainer and jobs).

    ``detector``: an already built detector for ``boxes='detector'`` (a job's, batched on its
    worker pool); default :func:`make_detector` on ``device`` with ``detector_options``. ``between_batches()`` runs after
    each batch of detector images and may raise (a job's cancel)."""
    if dataset_format == "mpii":
        if boxes.source != "gt":
            raise ValueError(f"MPII is scored on its annotated person centres and scales: boxes must be 'gt', "
                             f"not {boxes.source!r}")
        if max_images is not None:
            raise ValueError("max_images applies to COCO datasets only (MPII PCKh needs every annotated person)")
        mpii = MpiiKeypointDataset(ann_file, img_dir, input_size_wh, train=False, max_people=max_people)
        return EvalSet(mpii, Path(gt_file) if gt_file is not None else None, boxes.record())
    if dataset_format != "coco":
        raise ValueError(f"unknown dataset format {dataset_format!r} (coco or mpii)")
    common: dict[str, Any] = {"train": False, "max_images": max_images, "max_people": max_people}
    if boxes.source == "gt":
        return EvalSet(CocoKeypointDataset(ann_file, img_dir, input_size_wh, **common), None, boxes.record())
    if boxes.source == "detections":
        thr = boxes.score_thr if boxes.score_thr is not None else 0.0
        ds = CocoKeypointDataset(ann_file, img_dir, input_size_wh, use_gt_bbox=False, det_file=boxes.det_file,
                                 det_score_thr=thr, **common)
        return EvalSet(ds, None, boxes.record())
    det = detector if detector is not None else make_detector(boxes, device, **(detector_options or {}))
    runs: list[DetectionRun] = []

    def detect(images: Sequence[ImageRef]) -> list[dict[str, Any]]:
        runs.append(run_detector(det, images, detector_batch, between_batches))
        return runs[-1].coco_results()

    # The detector already dropped what scores below its threshold: keep every box it answers.
    ds = CocoKeypointDataset(ann_file, img_dir, input_size_wh, use_gt_bbox=False, detect_images=detect,
                             det_score_thr=0.0, **common)
    report = detection_report(ds.coco, runs[0], ds.eval_image_ids)
    return EvalSet(ds, None, boxes.record(detector_score_thr(det)), report)


def recipe_test_set(cfg: TrainConfig, data_dir: Path, device: str) -> tuple[EvalSet | None, str]:
    """The val split with the boxes the recipe's end-of-training test asks for (``test_boxes``), or
    (None, note) when the test scores the ground-truth boxes the validation already used; the note
    says why when the recipe asked for detections that are not there."""
    if cfg.dataset != "coco" or cfg.test_boxes not in ("detections", "detector"):
        return None, ""
    det = resolve_det_file(cfg, data_dir) if cfg.test_boxes == "detections" else None
    if cfg.test_boxes == "detections" and det is None:
        return None, (f"detections file {cfg.det_file} not found (relative to {data_dir}); "
                      "scored on ground-truth boxes, which reads higher than the paper's protocol")
    source = BoxSource("detector") if det is None else BoxSource("detections", det, cfg.det_bbox_thr)
    layout = find_split(data_dir, "coco", "val")
    return evaluation_set("coco", layout.ann_file, layout.img_dir, cfg.input_size, source, device=device), ""
