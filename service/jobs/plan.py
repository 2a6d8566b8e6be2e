"""The resolved, server-side form of an evaluation request: what a worker needs to run it.

A :class:`JobPlan` is made by the API (:class:`~ditepose.service.jobs.manager.JobService`)
from a client's :class:`~ditepose.service.jobs.schemas.EvaluateRequest`, stored with the job
record as JSON (:meth:`JobPlan.to_dict`) and read back by whichever worker runs the job.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

from ditepose.service.core.detection import detector_options
from ditepose.service.core.settings import DatasetSpec, ModelSpec, Settings
from ditepose.service.jobs.schemas import EvaluateRequest


@dataclass(frozen=True)
class EvalOptions:
    """How the plan's model is evaluated. ``boxes`` is :mod:`ditepose.training.boxes`'s option:
    'gt', 'detections' (the dataset's ``det_file``) or 'detector' (``detector`` run by the job, built
    with ``detector_options``: where the server keeps its weights). ``det_score_thr`` None: the
    source's default (detections 0.0, detector its own)."""

    flip_test: bool = True
    decoder: str = "default"
    boxes: str = "gt"
    detector: str | None = None  # boxes='detector' only
    det_score_thr: float | None = None
    detector_options: dict[str, Any] | None = None  # the server's constructor options (weights), JSON
    batch_size: int = 32
    max_images: int | None = None  # COCO only: the first N images that hold persons
    shard_size: int = 500  # images per shard (settings.shard_size unless the request asks for smaller)
    max_shards: int = 32  # settings.max_shards when the job was submitted

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalOptions:
        """Also reads plans stored before ``boxes`` (``use_gt_boxes``: true = gt, false = detections)."""
        data = dict(data)
        legacy = data.pop("use_gt_boxes", None)
        if legacy is not None and "boxes" not in data:
            data["boxes"] = "gt" if legacy else "detections"
        return cls(**data)


@dataclass(frozen=True)
class JobPlan:
    """A model (a served name, or a checkpoint of the checkpoint folder) on a named dataset."""

    model: ModelSpec
    served: bool  # True: a served model, taken from the serving pool when the job runs there
    dataset_name: str
    dataset: DatasetSpec
    options: EvalOptions
    # Set by the run that split the job (image-index ranges [start, stop) of image_groups): () = not split.
    shards: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model": self.model.model_dump(mode="json"),
            "served": self.served,
            "dataset_name": self.dataset_name,
            "dataset": self.dataset.model_dump(mode="json"),
            "options": asdict(self.options),
        }
        if self.shards:
            out["shards"] = [list(r) for r in self.shards]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobPlan:
        return cls(
            model=ModelSpec.model_validate(data["model"]),
            served=bool(data["served"]),
            dataset_name=str(data["dataset_name"]),
            dataset=DatasetSpec.model_validate(data["dataset"]),
            options=EvalOptions.from_dict(data["options"]),
            shards=tuple((int(a), int(b)) for a, b in data.get("shards", [])),
        )


def job_detector_name(settings: Settings, requested: str | None) -> str:
    """The name of the detector of a boxes='detector' job: the request's, else the service's default
    ('auto': nanodet -- an evaluation never falls back to whole-image boxes silently)."""
    if requested is not None:
        return requested
    return "nanodet" if settings.detector == "auto" else settings.detector


def eval_options(req: EvaluateRequest, dataset_name: str, dataset: DatasetSpec, settings: Settings) -> EvalOptions:
    """The request's options, checked against the dataset; ValueError says what does not fit."""
    from ditepose.training.boxes import BoxSource

    if req.max_images is not None and dataset.format != "coco":
        raise ValueError("max_images applies to COCO datasets only (MPII PCKh needs every person)")
    boxes = req.box_source
    if dataset.format == "mpii" and boxes != "gt":
        raise ValueError(f"boxes {boxes!r} does not apply to MPII dataset {dataset_name!r}: MPII is scored on its "
                         "annotated person centres and scales (boxes 'gt')")
    if boxes == "detections" and dataset.det_file is None and req.boxes is not None:
        # (the deprecated use_gt_boxes=false keeps its old behaviour: the job fails naming det_file)
        raise ValueError(f"boxes 'detections' needs a dataset with a det_file (person detections json); "
                         f"{dataset_name!r} has none: use boxes 'gt' or 'detector'")
    detector, thr, options = None, req.det_score_thr, None
    if boxes == "detector":
        detector = job_detector_name(settings, req.detector)
        if thr is None and detector == "nanodet":
            thr = settings.det_score_threshold  # the service's threshold, as for POST /v1/pose
        BoxSource("detector", score_thr=thr, detector=detector)  # the same checks as the CLI's
        if detector == "whole" and thr is not None:
            raise ValueError("det_score_thr: detector 'whole' has no score threshold")
        options = detector_options(settings, detector, for_job=True)
    shard_size = settings.shard_size if req.shard_size is None else min(req.shard_size, settings.shard_size)
    return EvalOptions(flip_test=req.flip_test, decoder=req.decoder, boxes=boxes, detector=detector,
                       det_score_thr=thr, detector_options=options, batch_size=req.batch_size,
                       max_images=req.max_images, shard_size=shard_size, max_shards=settings.max_shards)


def shard_ranges(num_images: int, shard_size: int, max_shards: int) -> list[tuple[int, int]]:
    """Contiguous image ranges [start, stop) of about ``shard_size`` images, at most ``max_shards`` of
    them, sizes differing by at most one image (so no shard is a straggler)."""
    count = max(1, min(max_shards, -(-num_images // max(shard_size, 1))))
    bounds = [num_images * i // count for i in range(count + 1)]
    return list(itertools.pairwise(bounds))
