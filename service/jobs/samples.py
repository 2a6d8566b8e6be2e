"""Evaluation sets as (image, person boxes) lists for the top-down pipeline.

The boxes follow mmpose 0.16's test-time datasets, so a job scores what ``ditepose evaluate``
scores: COCO ground-truth boxes are clipped like ``TopDownCocoDataset._load_coco_keypoint_
annotation_kernel`` (people without keypoints skipped) or come from a detections file; MPII
entries carry a centre and a scale (mmpose moves the centre 15*scale down and pads by 1.25),
turned here into the square box whose padded crop is that same centre and scale.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ditepose.model.transforms import PIXEL_STD


@dataclass
class ImageSample:
    """One image and the persons to estimate in it; ``ids`` number persons across the whole set."""

    image_id: int
    file: Path
    boxes: list[list[float]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


@dataclass
class EvalSet:
    """The samples plus what the metric needs (the pycocotools COCO object or the MPII gt file)."""

    format: str
    images: list[ImageSample]
    coco: Any = None
    mpii_gt: Path | None = None
    img_ids: list[int] | None = None  # COCO subset: score only these images (None: all of them)

    @property
    def num_persons(self) -> int:
        return sum(len(s.boxes) for s in self.images)


def _coco_api(ann_file: Path) -> Any:
    from pycocotools.coco import COCO as CocoApi

    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    with contextlib.redirect_stdout(io.StringIO()):
        return CocoApi(str(ann_file))


def _clean_gt_box(obj: dict, width: int, height: int) -> list[float] | None:
    """mmpose's box sanitising; None for boxes or people it skips."""
    if "bbox" not in obj:
        return None
    x, y, w, h = obj["bbox"]
    x1, y1 = max(0, x), max(0, y)
    x2, y2 = min(width - 1, x1 + max(0, w - 1)), min(height - 1, y1 + max(0, h - 1))
    if not (("area" not in obj or obj["area"] > 0) and x2 > x1 and y2 > y1):
        return None
    if "keypoints" not in obj or max(obj["keypoints"]) == 0 or obj.get("num_keypoints", 1) == 0:
        return None
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


def coco_set(ann_file: Path, img_dir: Path, use_gt_boxes: bool = True, det_file: Path | None = None,
             det_score_thr: float = 0.0) -> EvalSet:
    """COCO person keypoints; images without a usable person are left out (as mmpose does)."""
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {img_dir}")
    coco = _coco_api(ann_file)
    by_image: dict[int, ImageSample] = {}
    next_id = 0

    def sample(img_id: int) -> ImageSample:
        if img_id not in by_image:
            info = coco.loadImgs(img_id)[0]
            by_image[img_id] = ImageSample(img_id, img_dir / info["file_name"])
        return by_image[img_id]

    if use_gt_boxes:
        for img_id in sorted(coco.getImgIds()):
            info = coco.loadImgs(img_id)[0]
            for obj in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False)):
                box = _clean_gt_box(obj, info["width"], info["height"])
                if box is not None:
                    s = sample(img_id)
                    s.boxes.append(box), s.scores.append(1.0), s.ids.append(next_id)
                    next_id += 1
    else:
        if det_file is None:
            raise ValueError("use_gt_boxes=false needs a dataset with det_file (person detections json)")
        if not det_file.is_file():
            raise FileNotFoundError(f"detection file not found: {det_file}")
        dets = json.loads(det_file.read_text())
        if not isinstance(dets, list):
            raise ValueError(f"{det_file.name}: expected a json list of detections")
        known = set(coco.getImgIds())
        for det in dets:
            if det.get("category_id", 1) != 1 or float(det["score"]) < det_score_thr:
                continue
            if det["image_id"] not in known:
                raise ValueError(f"{det_file.name}: image_id {det['image_id']} is not in {ann_file.name}")
            box = [float(v) for v in det["bbox"][:4]]
            if box[2] <= 0 or box[3] <= 0:
                continue
            s = sample(det["image_id"])
            s.boxes.append(box), s.scores.append(float(det["score"])), s.ids.append(next_id)
            next_id += 1
    return EvalSet("coco", list(by_image.values()), coco=coco)


def mpii_set(ann_file: Path, img_dir: Path, gt_file: Path) -> EvalSet:
    """mmpose-format MPII json: one person per entry, in the ground-truth file's order."""
    if not ann_file.is_file():
        raise FileNotFoundError(f"MPII annotation file not found: {ann_file}")
    if not gt_file.is_file():
        raise FileNotFoundError(f"MPII ground-truth file not found: {gt_file}")
    entries = json.loads(ann_file.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{ann_file.name}: expected a json list of people")
    by_file: dict[str, ImageSample] = {}
    for i, entry in enumerate(entries):
        center = np.asarray(entry["center"], dtype=np.float64)
        scale = float(entry["scale"])
        if center[0] != -1:
            center[1] += 15 * scale
            scale *= 1.25
        center -= 1  # 1-based (matlab) -> 0-based
        side = scale * PIXEL_STD / 1.25  # box_to_center_scale pads by 1.25 again
        box = [float(center[0] - side / 2), float(center[1] - side / 2), float(side), float(side)]
        name = str(entry["image"])
        if name not in by_file:
            by_file[name] = ImageSample(len(by_file), img_dir / name)
        s = by_file[name]
        s.boxes.append(box), s.scores.append(1.0), s.ids.append(i)
    return EvalSet("mpii", list(by_file.values()), mpii_gt=gt_file)


def first_images(eval_set: EvalSet, max_images: int) -> EvalSet:
    """The first ``max_images`` images (by id) with persons, scored on those images only."""
    if eval_set.format != "coco":
        raise ValueError("max_images applies to COCO datasets only (MPII PCKh needs every annotated person)")
    images = sorted(eval_set.images, key=lambda s: s.image_id)[:max_images]
    return EvalSet("coco", images, coco=eval_set.coco, img_ids=[s.image_id for s in images])


def load_eval_set(dataset: dict, use_gt_boxes: bool = True, max_images: int | None = None) -> EvalSet:
    """From a catalogue payload (``Dataset.to_payload``)."""
    img_dir = Path(dataset["img_dir"])
    if dataset["format"] == "coco":
        det = dataset.get("det_file")
        full = coco_set(Path(dataset["ann_file"]), img_dir, use_gt_boxes, Path(det) if det else None)
        return first_images(full, max_images) if max_images is not None else full
    if max_images is not None:
        raise ValueError("max_images applies to COCO datasets only (MPII PCKh needs every annotated person)")
    if dataset["format"] == "mpii":
        if not use_gt_boxes:
            raise ValueError("MPII evaluation uses the annotated person centres; use_gt_boxes must be true")
        return mpii_set(Path(dataset["ann_file"]), img_dir, Path(dataset["gt_file"]))
    raise ValueError(f"unknown dataset format {dataset['format']!r}")
