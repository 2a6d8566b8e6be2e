"""Top-down keypoint datasets with mmpose 0.16 semantics (one sample per person box).

``CocoKeypointDataset`` follows ``TopDownCocoDataset`` (box cleaning, people without
keypoints skipped, xywh -> centre/scale with padding 1.25 and the 0.3-probability
centre jitter drawn once at load time in train mode, detection boxes for eval: from a detections
file or from a live detector, see :mod:`ditepose.training.boxes`);
``MpiiKeypointDataset`` follows ``TopDownMpiiDataset`` (1-based json, centre y +15*scale,
scale x1.25). Samples are dicts of numpy arrays, so the default collate works.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import Dataset

from ditepose.model.keypoints import COCO, MPII, KeypointSpec
from ditepose.model.transforms import PIXEL_STD, box_to_center_scale
from ditepose.training.augment import AugmentConfig, apply_pipeline

# A live detector's step for the dataset: [(image_id, image file)] -> detections in the detections
# file's format [{image_id, bbox xywh, score, category_id}] (see ditepose.training.boxes).
DetectImages = Callable[[Sequence[tuple[int, Path]]], list[dict[str, Any]]]


def read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class TopDownDataset(Dataset):
    """Shared sample logic: records -> augmented crops and Gaussian targets."""

    spec: KeypointSpec

    def __init__(self, input_size_wh: tuple[int, int], train: bool, recipe: AugmentConfig | None, seed: int) -> None:
        w, h = int(input_size_wh[0]), int(input_size_wh[1])
        if w % 32 or h % 32:
            raise ValueError(f"input size {w}x{h} must be divisible by 32")
        self.input_size_wh = (w, h)
        self.aspect_ratio = w / h
        self.train = train
        self.recipe = recipe or AugmentConfig()
        self.seed = seed
        self.epoch = 0
        self.records: list[dict[str, Any]] = []

    def set_epoch(self, epoch: int) -> None:
        """Augmentation randomness is a function of (seed, epoch, index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        rec = self.records[idx]
        s = {
            "img": read_rgb(rec["image_file"]),
            "joints": rec["joints"].copy(), "visible": rec["visible"].copy(),
            "center": rec["center"].copy(), "scale": rec["scale"].copy(),
        }
        rng = np.random.default_rng([self.seed, self.epoch, idx]) if self.train else None
        apply_pipeline(s, rng, self.input_size_wh, self.spec.flip_pairs, self.spec.upper_body_ids, self.recipe)
        return {
            "input": s["input"], "target": s["target"], "target_weight": s["target_weight"],
            "center": s["center"].astype(np.float32), "scale": np.asarray(s["scale"], np.float32),
            "rotation": np.float32(s["rotation"]), "bbox_score": np.float32(rec["bbox_score"]),
            "image_id": int(rec["image_id"]), "index": idx,
            "area": np.float32(np.prod(np.asarray(s["scale"]) * PIXEL_STD)),
        }


class CocoKeypointDataset(TopDownDataset):
    """COCO person keypoints, one sample per (cleaned) GT box or detection box.

    Boxes (``use_gt_bbox=False``) come from ``det_file`` (the paper's protocol) or from
    ``detect_images`` (a live detector run on the images to be scored); either way a record's
    ``bbox_score`` is the detection's score, which COCO rescoring multiplies in. ``max_images``
    keeps the first N images (by id) that hold annotated persons, whatever the boxes, so GT and
    detection boxes are scored on the same images. Each record keeps its source box as ``bbox``
    (xywh, image pixels)."""

    def __init__(
        self,
        ann_file: str | Path,
        img_dir: str | Path,
        input_size_wh: tuple[int, int] = (192, 256),
        train: bool = True,
        recipe: AugmentConfig | None = None,
        use_gt_bbox: bool = True,
        det_file: str | Path | None = None,
        det_score_thr: float = 0.0,
        seed: int = 0,
        max_people: int | None = None,
        max_images: int | None = None,
        detect_images: DetectImages | None = None,
    ) -> None:
        super().__init__(input_size_wh, train, recipe, seed)
        from pycocotools.coco import COCO as CocoApi

        self.spec = COCO
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.ann_file}")
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.img_dir}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = CocoApi(str(self.ann_file))
        jitter_rng = np.random.default_rng([seed, 12345])
        gt_records: list[dict[str, Any]] = []
        for img_id in sorted(self.coco.getImgIds()):
            gt_records += self._gt_records(img_id, jitter_rng)
        self.eval_image_ids: list[int] | None = None  # None: score on every image of the annotations
        if max_images is not None:
            # The first images (by id) that have persons; scored on those images only.
            self.eval_image_ids = sorted({r["image_id"] for r in gt_records})[:max_images]
        self.records = self._box_records(gt_records, use_gt_bbox, det_file, det_score_thr, detect_images)
        if self.eval_image_ids is not None:
            kept = set(self.eval_image_ids)
            self.records = [r for r in self.records if r["image_id"] in kept]
        if max_people is not None and len(self.records) > max_people:
            self._keep_people(max_people)

    def _box_records(self, gt_records: list[dict[str, Any]], use_gt_bbox: bool, det_file: str | Path | None,
                     det_score_thr: float, detect_images: DetectImages | None) -> list[dict[str, Any]]:
        """The records of the dataset's boxes: the annotated ones, or detections (file or live detector)."""
        if use_gt_bbox:
            if det_file is not None or detect_images is not None:
                raise ValueError("use_gt_bbox=True takes neither det_file nor detect_images")
            return gt_records
        images = self.eval_image_ids if self.eval_image_ids is not None else sorted(self.coco.getImgIds())
        if det_file is not None and detect_images is None:
            return self._det_records(self._read_det_file(Path(det_file)), det_score_thr, str(det_file), set(images))
        if detect_images is not None and det_file is None:
            files = [(img_id, self.img_dir / self.coco.loadImgs(img_id)[0]["file_name"]) for img_id in images]
            return self._det_records(detect_images(files), det_score_thr, "the detector", set(images))
        raise ValueError("use_gt_bbox=False needs det_file (json list of {image_id, bbox, score, "
                         "category_id}) or detect_images (a live detector), exactly one of them")

    def _keep_people(self, max_people: int) -> None:
        """Cut at an image boundary and score only those images, so unseen people are not misses."""
        last = self.records[max_people - 1]["image_id"]
        keep = max_people
        while keep < len(self.records) and self.records[keep]["image_id"] == last:
            keep += 1
        self.records = self.records[:keep]
        self.eval_image_ids = sorted({r["image_id"] for r in self.records})

    def _center_scale(self, box: list[float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        _x, _y, w, h = box
        center, scale = box_to_center_scale(box, self.aspect_ratio, padding=1.25)
        if self.train and rng.random() < 0.3:  # mmpose's load-time centre jitter
            center = center + (0.4 * (rng.random(2) - 0.5) * [w, h]).astype(np.float32)
        return center.astype(np.float32), scale

    def _gt_records(self, img_id: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        info = self.coco.loadImgs(img_id)[0]
        width, height = info["width"], info["height"]
        out = []
        for obj in self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id, iscrowd=False)):
            if "bbox" not in obj:
                continue
            x, y, w, h = obj["bbox"]
            x1, y1 = max(0, x), max(0, y)
            x2, y2 = min(width - 1, x1 + max(0, w - 1)), min(height - 1, y1 + max(0, h - 1))
            if not (("area" not in obj or obj["area"] > 0) and x2 > x1 and y2 > y1):
                continue
            if "keypoints" not in obj or max(obj["keypoints"]) == 0 or obj.get("num_keypoints", 1) == 0:
                continue
            kpts = np.asarray(obj["keypoints"], dtype=np.float32).reshape(-1, 3)
            center, scale = self._center_scale([x1, y1, x2 - x1, y2 - y1], rng)
            out.append({
                "image_file": self.img_dir / info["file_name"], "image_id": img_id,
                "joints": kpts[:, :2].copy(), "visible": np.minimum(1, kpts[:, 2]),
                "center": center, "scale": scale, "bbox_score": 1.0, "ann_id": obj["id"],
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            })
        return out

    @staticmethod
    def _read_det_file(det_file: Path) -> list[dict[str, Any]]:
        if not det_file.is_file():
            raise FileNotFoundError(f"detection file not found: {det_file}")
        try:
            dets = json.loads(det_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{det_file}: not JSON: {exc}") from exc
        if not isinstance(dets, list):
            raise ValueError(f"{det_file}: expected a json list of detections")
        return dets

    def _det_records(self, dets: list[dict[str, Any]], thr: float, source: str,
                     images: set[int]) -> list[dict[str, Any]]:
        """Person detections (score >= ``thr``) on ``images`` -> records; an image id the
        annotations do not know is an error (a detections file for another split)."""
        known = set(self.coco.getImgIds())
        rng = np.random.default_rng(0)
        out = []
        for i, det in enumerate(dets):
            try:
                image_id, score = det["image_id"], float(det["score"])
                box = [float(v) for v in det["bbox"][:4]]
                if len(box) != 4:
                    raise ValueError("bbox needs 4 numbers")
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise ValueError(f"{source}: detection {i} is not {{image_id, bbox, score, category_id}}: "
                                 f"{det!r}") from exc
            if det.get("category_id", 1) != 1 or score < thr:
                continue
            if image_id not in known:
                raise ValueError(f"{source}: image_id {image_id} is not in {self.ann_file.name}")
            if image_id not in images:
                continue
            info = self.coco.loadImgs(image_id)[0]
            center, scale = self._center_scale(box, rng)
            k = self.spec.num_joints
            out.append({
                "image_file": self.img_dir / info["file_name"], "image_id": image_id,
                "joints": np.zeros((k, 2), np.float32), "visible": np.ones(k, np.float32),
                "center": center, "scale": scale, "bbox_score": score, "bbox": box,
            })
        return out


class MpiiKeypointDataset(TopDownDataset):
    """mmpose-format MPII json: [{image, center, scale, joints (1-based), joints_vis}]."""

    def __init__(self, ann_file: str | Path, img_dir: str | Path, input_size_wh: tuple[int, int] = (256, 256),
                 train: bool = True, recipe: AugmentConfig | None = None, seed: int = 0,
                 max_people: int | None = None) -> None:
        super().__init__(input_size_wh, train, recipe, seed)
        self.spec = MPII
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"MPII annotation file not found: {self.ann_file}")
        entries = json.loads(self.ann_file.read_text())
        for i, a in enumerate(entries):
            center = np.array(a["center"], dtype=np.float32)
            scale = np.array([a["scale"], a["scale"]], dtype=np.float32)
            if center[0] != -1:  # mmpose: avoid cropping limbs
                center[1] = center[1] + 15 * scale[1]
                scale = scale * 1.25
            center = center - 1  # 1-based (matlab) -> 0-based
            joints = np.array(a.get("joints", np.zeros((16, 2))), dtype=np.float32)
            vis = np.array(a.get("joints_vis", np.zeros(16)), dtype=np.float32)
            if joints.shape != (16, 2):
                raise ValueError(f"{self.ann_file}: entry {i} has joints of shape {joints.shape}, want (16, 2)")
            self.records.append({
                "image_file": self.img_dir / a["image"], "image_id": i,
                "joints": joints - 1, "visible": vis, "center": center, "scale": scale, "bbox_score": 1.0,
            })
        if max_people is not None:
            self.records = self.records[:max_people]
