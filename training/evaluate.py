"""The one evaluation loop: a top-down dataset -> the pose pipeline -> the metric table.

``ditepose evaluate``, the trainer's periodic validation and the evaluation jobs all call
:func:`predict` then :func:`score`. Only ``infer`` differs: a module (training), an engine
(the CLI) or a worker pool's batcher (jobs), so the three report the same numbers for the same
model and data. The crops are the served pipeline's own (:class:`TopDownPipeline`), from the
datasets' mmpose centres and scales.

Shapes: crops [P, 3, H, W] float32 (normalised RGB), heatmaps [P, K, H/4, W/4] fp32; each
prediction's ``keypoints`` is [K, 3] = (x, y, score) in image pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from ditepose.model.pipeline import TopDownPipeline, infer_in_batches
from ditepose.training.coco_eval import evaluate_coco
from ditepose.training.datasets import CocoKeypointDataset, MpiiKeypointDataset, TopDownDataset, read_rgb
from ditepose.training.mpii_eval import evaluate_mpii

InferFn = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[float], None]


class Prediction(TypedDict):
    """One person of the dataset (``bbox_id`` = its record index), as the metrics read it."""

    image_id: int
    image_file: str
    bbox_id: int
    bbox: list[float]  # [x, y, w, h] of the crop's unpadded box, image pixels
    box_score: float
    score: float  # the person's rescored confidence (mean of confident joints x box score)
    area: float
    keypoints: np.ndarray  # [K, 3]


def pipeline_for(dataset: TopDownDataset, flip_test: bool = True, decoder: str = "default") -> TopDownPipeline:
    """The served top-down pipeline at the dataset's input size and keypoint layout."""
    return TopDownPipeline(dataset.input_size_wh, dataset.spec, flip_test=flip_test, decoder=decoder)


def image_groups(dataset: TopDownDataset) -> list[list[int]]:
    """Record indices grouped by image, in order of first appearance (each image is read once).

    A sharded evaluation job splits this list into contiguous runs, one per shard (``images``
    of :func:`predict`), so each image's persons stay in one shard."""
    groups: dict[Path, list[int]] = {}
    for index, record in enumerate(dataset.records):
        groups.setdefault(Path(record["image_file"]), []).append(index)
    return list(groups.values())


def _chunks(images: list[list[int]], persons_per_chunk: int) -> Iterator[list[list[int]]]:
    """Whole images grouped until a chunk holds at least ``persons_per_chunk`` persons."""
    chunk: list[list[int]] = []
    count = 0
    for indices in images:
        chunk.append(indices)
        count += len(indices)
        if count >= persons_per_chunk:
            yield chunk
            chunk, count = [], 0
    if chunk:
        yield chunk


@torch.no_grad()
def predict(
    infer: InferFn,
    dataset: TopDownDataset,
    pipeline: TopDownPipeline,
    batch_size: int = 32,
    between_batches: Progress | None = None,
    images: list[list[int]] | None = None,
) -> list[Prediction]:
    """One prediction per dataset record, in record order; with ``images`` (a slice of
    :func:`image_groups`), for those images' records only (a job's shard).

    ``between_batches(percent)`` runs after each chunk of about ``batch_size`` persons; it may
    raise to stop the loop (a job's cancel or time limit)."""
    groups = image_groups(dataset) if images is None else images
    total = max(sum(len(g) for g in groups), 1)
    out: list[Prediction] = []
    for chunk in _chunks(groups, batch_size):
        prepared = []
        for indices in chunk:
            records = [dataset.records[i] for i in indices]
            prepared.append(pipeline.prepare_center_scale(
                read_rgb(Path(records[0]["image_file"])),
                np.stack([r["center"] for r in records]),
                np.stack([np.asarray(r["scale"], np.float32) for r in records]),
                np.asarray([r["bbox_score"] for r in records], np.float32),
            ))
        heatmaps = infer_in_batches(infer, torch.cat([p.crops for p in prepared]), batch_size,
                                    pipeline.heatmap_shape)
        start = 0
        for indices, prep in zip(chunk, prepared, strict=True):
            size = len(prep.crops)
            persons = pipeline.finish(prep, heatmaps[start : start + size])
            start += size
            for index, person in zip(indices, persons, strict=True):
                record = dataset.records[index]
                out.append(Prediction(
                    image_id=int(record["image_id"]), image_file=str(record["image_file"]), bbox_id=index,
                    bbox=[float(v) for v in person.bbox_xywh], box_score=float(record["bbox_score"]),
                    score=float(person.score), area=float(person.area), keypoints=person.keypoints,
                ))
        if between_batches is not None:
            between_batches(100.0 * len(out) / total)
    return sorted(out, key=lambda p: p["bbox_id"])


def score(dataset: TopDownDataset, predictions: list[Prediction], mpii_gt: str | Path | None = None) -> dict[str, float]:
    """COCO AP table or MPII PCKh table for predictions made on ``dataset``."""
    if isinstance(dataset, CocoKeypointDataset):
        return evaluate_coco(list(predictions), dataset.coco, img_ids=dataset.eval_image_ids)
    if isinstance(dataset, MpiiKeypointDataset):
        if mpii_gt is None:
            raise ValueError("MPII evaluation needs the ground-truth file (mpii_gt_*.json/.npz/.mat)")
        ordered = sorted(predictions, key=lambda p: p["bbox_id"])
        return evaluate_mpii(np.stack([p["keypoints"][:, :2] for p in ordered]), mpii_gt)
    raise TypeError(f"no metric for {type(dataset).__name__}")


def primary_metric(dataset: TopDownDataset) -> str:
    return "AP" if isinstance(dataset, CocoKeypointDataset) else "PCKh"


def predictions_by_image(predictions: list[Prediction]) -> list[dict[str, Any]]:
    """The per-image JSON layout of a predictions file (jobs' ``GET /v1/jobs/{id}/predictions``)."""
    images: dict[int, dict[str, Any]] = {}
    for p in predictions:
        entry = images.setdefault(p["image_id"], {"image_id": p["image_id"], "file_name": Path(p["image_file"]).name,
                                                   "persons": []})
        entry["persons"].append({
            "id": p["bbox_id"], "bbox": p["bbox"], "box_score": p["box_score"], "score": p["score"],
            "area": p["area"], "keypoints": np.asarray(p["keypoints"], dtype=np.float64).tolist(),
        })
    return list(images.values())
