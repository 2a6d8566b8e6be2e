"""What a job's run takes from its worker: the model, lent by the worker pool; the dataset, read
once per process; and a live person detector whose device stage runs on the pool.

The one way to lend a model to a job is :data:`job_models` (:meth:`JobModels.use`): a whole job
borrows it for its run (:func:`model_in_pool`), the shards of a sharded job share one load
between them. Both :mod:`ditepose.service.jobs.evaluation` and :mod:`ditepose.service.jobs.shards`
import this module.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch

from ditepose.model.detectors import PersonDetector, StagedDetector, detect_staged
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.model_loader import LoadedModel, load_model
from ditepose.service.core.settings import ModelSpec
from ditepose.service.jobs.plan import JobPlan
from ditepose.training.boxes import BoxSource, EvalSet, evaluation_set, make_detector
from ditepose.training.detection_eval import detector_score_thr

# ---------------------------------------------------------------------------------------------- models


class ModelPlan(Protocol):
    """What lending a model needs of a job's plan (an evaluation's :class:`JobPlan`, a video's plan)."""

    @property
    def model(self) -> ModelSpec: ...

    @property
    def served(self) -> bool: ...


class JobModels:
    """A job's model stays in the worker's pool between its shards (a checkpoint load per shard would
    be most of the cost of sharding); the first shard of another job evicts it once no shard uses it.
    At most one idle job model per pool lingers after its job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, str], tuple[LoadedModel, list[int]]] = {}  # (pool, job) -> model, [users]

    @contextmanager
    def use(self, pool: WorkerPool, plan: ModelPlan, job_id: str) -> Iterator[LoadedModel]:
        """The plan's model in ``pool``: a served model the pool already has, else loaded (by the
        service's own loader) and added for this job only."""
        if plan.served and plan.model.name in pool.models:  # the pool's own (embedded mode): nothing to load
            yield pool.models[plan.model.name]
            return
        key = (id(pool), job_id)
        with self._lock:  # loads one at a time: a pool's shards of one job share one load
            self._evict(pool, keep=job_id)
            entry = self._entries.get(key)
            if entry is None:
                loaded = load_model(plan.model.model_copy(update={"name": f"job-{job_id}/{plan.model.name}"}))
                pool.add_model(loaded, served=False)
                entry = self._entries[key] = (loaded, [0])
            entry[1][0] += 1
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1][0] -= 1

    def _evict(self, pool: WorkerPool, keep: str) -> None:
        for key, (loaded, users) in list(self._entries.items()):
            if key[0] == id(pool) and key[1] != keep and users[0] == 0:
                pool.remove_model(loaded.name)
                del self._entries[key]

    def release(self, pool: WorkerPool, job_id: str) -> None:
        """The job is over (merged, failed or cancelled): drop its model now if no shard uses it."""
        with self._lock:
            entry = self._entries.get((id(pool), job_id))
            if entry is not None and entry[1][0] == 0:
                pool.remove_model(entry[0].name)
                del self._entries[(id(pool), job_id)]


job_models = JobModels()


@contextmanager
def model_in_pool(pool: WorkerPool, plan: JobPlan, job_id: str) -> Iterator[LoadedModel]:
    """The plan's model lent to one whole run of job ``job_id``, removed from the pool after it."""
    try:
        with job_models.use(pool, plan, job_id) as model:
            yield model
    finally:
        job_models.release(pool, job_id)


# -------------------------------------------------------------------------------------------- detector


class PoolDetector:
    """A staged detector (NanoDet, torchvision) whose device stage runs as background work on a
    worker pool's detector batcher, as a job's pose crops do: batched with live requests'
    detections on the pool's devices, yielding to them. Pre- and post-processing (threshold,
    NMS) stay here, with this job's threshold."""

    def __init__(self, detector: StagedDetector, pool: WorkerPool, timeout_s: float) -> None:
        self.detector, self.timeout_s = detector, timeout_s
        self.name = detector.name
        self.score_thr = detector_score_thr(detector)  # what the job's result reports
        # the pool keeps one device stage per detector name: the network, whatever the threshold
        self.batcher = pool.add_detector(detector)

    def detect_batch(self, images_rgb: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        return detect_staged(self.detector, images_rgb, forward=self._on_pool)

    def _on_pool(self, batch: torch.Tensor) -> torch.Tensor:
        return self.batcher.submit_sync(batch, self.timeout_s, background=True)

    def detect(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.detect_batch([image_rgb])[0]


_detectors: dict[str, PersonDetector] = {}
_detectors_lock = threading.Lock()


def job_detector(plan: JobPlan, pool: WorkerPool, timeout_s: float) -> PersonDetector:
    """The plan's live detector (a detector object; the plan names it), built once per process
    and threshold (weights load once); a staged one runs on ``pool`` (:class:`PoolDetector`)."""
    opts = plan.options
    return pool_detector(opts.detector or "nanodet", opts.det_score_thr, opts.detector_options, pool, timeout_s)


def pool_detector(name: str, score_thr: float | None, options: dict[str, Any] | None, pool: WorkerPool,
                  timeout_s: float) -> PersonDetector:
    """Detector ``name`` with ``score_thr`` (None: its own) and constructor ``options`` (the server's,
    :func:`~ditepose.service.core.detection.detector_options`), built once per process; a staged one
    runs its device stage on ``pool`` (:class:`PoolDetector`). Evaluation and video jobs both use it."""
    source = BoxSource("detector", score_thr=score_thr, detector=name)
    key = json.dumps([source.detector, source.score_thr, options], sort_keys=True)
    with _detectors_lock:
        det = _detectors.get(key)
        if det is None:
            det = _detectors[key] = make_detector(source, "cpu", **(options or {}))
    if isinstance(det, StagedDetector):
        return PoolDetector(det, pool, timeout_s)
    return det


# --------------------------------------------------------------------------------------------- dataset


def load_dataset(plan: JobPlan, input_size: tuple[int, int], pool: WorkerPool | None = None,
                 timeout_s: float = 3600.0, between_batches: Callable[[], None] | None = None) -> EvalSet:
    """The plan's dataset in evaluation mode, at the model's input size, with the plan's boxes
    (:func:`ditepose.training.boxes.evaluation_set`, as ``ditepose evaluate``)."""
    spec, opts = plan.dataset, plan.options
    if spec.format == "coco" and opts.boxes == "detections" and spec.det_file is None:
        raise ValueError(f"boxes 'detections' needs a dataset with det_file (person detections json); "
                         f"{plan.dataset_name!r} has none")
    if opts.boxes == "detections":
        boxes = BoxSource("detections", spec.det_file, opts.det_score_thr)
    elif opts.boxes == "detector":
        boxes = BoxSource("detector", score_thr=opts.det_score_thr, detector=opts.detector or "nanodet")
    else:
        boxes = BoxSource(opts.boxes)
    detector = None
    if boxes.source == "detector" and spec.format == "coco":
        if pool is None:
            raise ValueError("boxes 'detector' needs the job's worker pool")
        detector = job_detector(plan, pool, timeout_s)
    return evaluation_set(spec.format, spec.ann_file, spec.img_dir, input_size, boxes, gt_file=spec.gt_file,
                          max_images=opts.max_images, detector=detector, between_batches=between_batches)


_eval_sets: dict[str, EvalSet] = {}
_eval_sets_lock = threading.Lock()


def cached_eval_set(plan: JobPlan, input_size: tuple[int, int]) -> EvalSet:
    """The plan's dataset, loaded once per process (the shards of a job, and its merge, on one
    worker read the same annotation file once). Deterministic, so every worker's copy lists the same
    records in the same order. Never for boxes='detector' (those jobs are not split)."""
    key = json.dumps([plan.dataset.model_dump(mode="json"), plan.options.boxes, plan.options.det_score_thr,
                      plan.options.max_images, list(input_size)], sort_keys=True)
    with _eval_sets_lock:
        cached = _eval_sets.get(key)
    if cached is not None:
        return cached
    eval_set = load_dataset(plan, input_size)
    with _eval_sets_lock:
        while len(_eval_sets) >= 2:  # a worker runs one job's shards at a time, mostly
            _eval_sets.pop(next(iter(_eval_sets)))
        _eval_sets[key] = eval_set
    return eval_set
