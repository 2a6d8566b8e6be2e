"""The person detector's own report on a COCO keypoints set: does it find the people the pose
network is scored on?

A top-down evaluation with detector boxes can only be as good as its boxes, so the detector's
numbers go beside the pose AP (``ditepose evaluate --boxes detector``, jobs with
``boxes=detector``, ``ditepose evaluate-detector``, ``bench/detector.py``). The definitions are
the ones ``bench/detector.py`` has always used:

- targets: the non-crowd person annotations with at least 5 labelled joints; a target is found
  by a detected box with IoU >= 0.5 (``recall_at_iou50`` = found / targets);
- a false positive is a detected box whose IoU with every person annotation of its image (crowd
  and few-joint ones included) is below 0.5 (``false_positives_per_image``);
- person-box AP / AP50: pycocotools' bbox AP over all person annotations of the scored images,
  from the detector's boxes at its own threshold;
- ``ms_per_image_median``: the detector's time per image (a batch's time split over its images:
  reading the files excluded), median over the images.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ditepose.model.detectors import PersonDetector

MIN_JOINTS = 5  # a target has at least this many labelled joints
IOU_THR = 0.5

ImageRef = tuple[int, Path]  # (COCO image id, image file)


def iou_xywh(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes [x, y, w, h]."""
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / max(a[2] * a[3] + b[2] * b[3] - w * h, 1e-9)


def detector_name(detector: PersonDetector) -> str:
    return str(getattr(detector, "name", None) or type(detector).__name__)


def detector_score_thr(detector: PersonDetector) -> float | None:
    """The threshold the detector drops boxes below (None: it has none, e.g. 'whole')."""
    thr = getattr(detector, "score_thr", None)
    return None if thr is None else float(thr)


@dataclass
class DetectionRun:
    """A detector's boxes on a list of images, with its time per image."""

    detector: str
    score_thr: float | None
    batch_size: int
    by_image: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # id -> (xywh [N,4], [N])
    seconds: dict[int, float] = field(default_factory=dict)  # id -> detector seconds for that image

    def coco_results(self) -> list[dict[str, Any]]:
        """The boxes in the detections file's format [{image_id, category_id, bbox, score}], best first per image."""
        return [{"image_id": image_id, "category_id": 1, "bbox": [float(v) for v in box], "score": float(score)}
                for image_id, (boxes, scores) in self.by_image.items()
                for box, score in zip(boxes, scores, strict=True)]

    @property
    def num_detections(self) -> int:
        return sum(len(scores) for _, scores in self.by_image.values())


def run_detector(detector: PersonDetector, images: Sequence[ImageRef], batch_size: int = 8,
                 between_batches: Callable[[], None] | None = None) -> DetectionRun:
    """``detector`` on every image, ``batch_size`` images per call of ``detect_batch`` when the
    detector has it (one forward pass per batch), else ``detect`` image by image.

    ``between_batches()`` runs after each batch; it may raise to stop (a job's cancel)."""
    from ditepose.training.datasets import read_rgb

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batched = getattr(detector, "detect_batch", None)
    run = DetectionRun(detector_name(detector), detector_score_thr(detector), batch_size if batched else 1)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        rgbs = [read_rgb(Path(path)) for _, path in chunk]
        began = time.perf_counter()
        outs = batched(rgbs) if batched is not None else [detector.detect(img) for img in rgbs]
        seconds = (time.perf_counter() - began) / max(len(chunk), 1)
        for (image_id, _), (boxes, scores) in zip(chunk, outs, strict=True):
            run.by_image[int(image_id)] = (np.asarray(boxes, np.float32).reshape(-1, 4),
                                           np.asarray(scores, np.float32).reshape(-1))
            run.seconds[int(image_id)] = seconds
        if between_batches is not None:
            between_batches()
    return run


def _bbox_ap(coco: Any, dets: list[dict[str, Any]], image_ids: Sequence[int]) -> tuple[float, float]:
    from pycocotools.cocoeval import COCOeval

    if not dets:  # pycocotools cannot load an empty result list; no boxes find nothing
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.params.catIds = [1]
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[0]), 0.0), max(float(ev.stats[1]), 0.0)


def detection_report(coco: Any, run: DetectionRun, image_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """The report (module docstring) of ``run`` against the person annotations of ``coco`` (a
    pycocotools COCO) on ``image_ids`` (default: the images the detector ran on)."""
    ids = sorted(run.by_image) if image_ids is None else [int(i) for i in image_ids]
    missing = [i for i in ids if i not in run.by_image]
    if missing:
        raise ValueError(f"the detector did not run on image(s) {missing[:5]}")
    targets = found = false_pos = 0
    for image_id in ids:
        boxes, _ = run.by_image[image_id]
        people = coco.loadAnns(coco.getAnnIds(imgIds=image_id, catIds=[1], iscrowd=None))
        goals = [a["bbox"] for a in people if not a.get("iscrowd", 0) and a.get("num_keypoints", 0) >= MIN_JOINTS]
        targets += len(goals)
        found += sum(any(iou_xywh(g, b) >= IOU_THR for b in boxes) for g in goals)
        false_pos += sum(not any(iou_xywh(b, a["bbox"]) >= IOU_THR for a in people) for b in boxes)
    wanted = set(ids)
    dets = [d for d in run.coco_results() if d["image_id"] in wanted]
    ap, ap50 = _bbox_ap(coco, dets, ids)
    times = [run.seconds[i] for i in ids]
    return {
        "detector": run.detector, "score_thr": run.score_thr, "images": len(ids), "detections": len(dets),
        "targets": targets, "found": found, "recall_at_iou50": found / targets if targets else 0.0,
        "false_positives": false_pos, "false_positives_per_image": false_pos / len(ids) if ids else 0.0,
        "bbox_ap": ap, "bbox_ap50": ap50,
        "ms_per_image_median": 1000 * statistics.median(times) if times else 0.0, "batch_size": run.batch_size,
    }


def evaluate_detector(detector: PersonDetector, ann_file: str | Path, img_dir: str | Path,
                      max_images: int | None = None, batch_size: int = 1) -> dict[str, Any]:
    """Run ``detector`` on the images of a COCO keypoints file and report (module docstring).

    ``max_images``: the first N images (by id) holding annotated persons, the images
    ``CocoKeypointDataset(max_images=N)`` scores; default every image of the file (images without
    people count for false positives and box AP). ``batch_size`` 1 times one image at a time."""
    from ditepose.training.datasets import CocoKeypointDataset

    gt = CocoKeypointDataset(ann_file, img_dir, train=False, max_images=max_images)
    ids = gt.eval_image_ids if gt.eval_image_ids is not None else sorted(gt.coco.getImgIds())
    images = [(i, gt.img_dir / gt.coco.loadImgs(i)[0]["file_name"]) for i in ids]
    return detection_report(gt.coco, run_detector(detector, images, batch_size), ids)
