"""THE evaluation task body, shared by the Celery worker and the embedded thread executor.

:func:`run_job` owns a job's life cycle (claim with a lease, run, compare-and-set the final
state). :func:`evaluate_plan` is the work itself: the plan's dataset goes through the one
evaluation loop (:mod:`ditepose.training.evaluate`) with its crops sent through a worker
pool's batcher as background work. In embedded mode that pool is the serving pool, so a job's
crops are batched with live requests and yield to them; a Celery worker process runs the same
code on a pool of its own. Progress, cancellation and the soft time limit are checked between
batches; the predictions file is written atomically before the metrics are computed.

The person boxes are the plan's ``boxes`` (:mod:`ditepose.training.boxes`, as ``ditepose
evaluate``): ground truth, the dataset's detections file, or a live detector whose device stage
runs on the same pool as background batches (:class:`PoolDetector`); the result records them
(``box_source``) and, for a detector, adds its report.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditepose.model.detectors import PersonDetector, StagedDetector, detect_staged
from ditepose.service.batching.batcher import DeadlineExceeded
from ditepose.service.batching.infer import BatcherInfer
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.model_loader import LoadedModel, load_model
from ditepose.service.jobs.lease import Lease, LeaseLost
from ditepose.service.jobs.plan import JobPlan
from ditepose.service.jobs.records import JobRecord, JobStore, atomic_write_text
from ditepose.training.boxes import EvalSet

log = logging.getLogger(__name__)

Progress = Callable[[float], None]


class JobCancelled(Exception):
    """A client asked to cancel; raised between batches."""


class JobTimeLimit(Exception):
    """The job ran past the soft time limit; raised between batches."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def predictions_path(jobs_dir: Path, job_id: str) -> Path:
    """One file per job id: a rerun of the same job replaces it, never duplicates it."""
    return jobs_dir / job_id / "predictions.json"


class PoolDetector:
    """A staged detector (NanoDet, torchvision) whose device stage runs as background work on a
    worker pool's detector batcher, as a job's pose crops do: batched with live requests'
    detections on the pool's devices, yielding to them. Pre- and post-processing (threshold,
    NMS) stay here, with this job's threshold."""

    def __init__(self, detector: StagedDetector, pool: WorkerPool, timeout_s: float) -> None:
        self.detector, self.timeout_s = detector, timeout_s
        self.name = detector.name
        self.score_thr = getattr(detector, "score_thr", None)
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
    """The plan's live detector, built once per process and threshold (weights load once); a
    staged one runs on ``pool`` (:class:`PoolDetector`)."""
    from ditepose.training.boxes import BoxSource, make_detector

    opts = plan.options
    source = BoxSource("detector", score_thr=opts.det_score_thr, detector=opts.detector or "nanodet")
    key = json.dumps([source.detector, source.score_thr, opts.detector_options], sort_keys=True)
    with _detectors_lock:
        det = _detectors.get(key)
        if det is None:
            det = _detectors[key] = make_detector(source, "cpu", **(opts.detector_options or {}))
    if isinstance(det, StagedDetector):
        return PoolDetector(det, pool, timeout_s)
    return det


def load_dataset(plan: JobPlan, input_size: tuple[int, int], pool: WorkerPool | None = None,
                 timeout_s: float = 3600.0, between_batches: Callable[[], None] | None = None) -> EvalSet:
    """The plan's dataset in evaluation mode, at the model's input size, with the plan's boxes
    (:func:`ditepose.training.boxes.evaluation_set`, as ``ditepose evaluate``)."""
    from ditepose.training.boxes import BoxSource, evaluation_set

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


@contextmanager
def model_in_pool(pool: WorkerPool, plan: JobPlan, job_id: str) -> Iterator[LoadedModel]:
    """The plan's model in ``pool``: a served model the pool already has, else loaded (by the
    service's own loader) and added for this job only."""
    if plan.served and plan.model.name in pool.models:
        yield pool.models[plan.model.name]
        return
    spec = plan.model.model_copy(update={"name": f"job-{job_id}/{plan.model.name}"})
    loaded = load_model(spec)
    pool.add_model(loaded, served=False)
    try:
        yield loaded
    finally:
        pool.remove_model(loaded.name)


Split = Callable[[list[tuple[int, int]]], None]


def evaluate_plan(
    plan: JobPlan, job_id: str, pool: WorkerPool, out_file: Path, between_batches: Progress, timeout_s: float,
    split: Split | None = None,
) -> dict[str, Any] | None:
    """Run one job end to end on ``pool``; returns the job result (metrics, counts, timings).

    With ``split`` (a queue for shards), a job over more than ``shard_size`` images is handed to it
    as image ranges instead (:mod:`ditepose.service.jobs.shards`), and None is returned."""
    from ditepose.service.jobs.plan import shard_ranges
    from ditepose.training.evaluate import image_groups, pipeline_for, predict, predictions_by_image, score

    t0 = time.perf_counter()
    if not plan.dataset.ann_file.is_file():  # bad data fails before the model loads
        raise FileNotFoundError(f"annotation file not found: {plan.dataset.ann_file}")
    with model_in_pool(pool, plan, job_id) as model:
        if model.dataset != plan.dataset.format:
            raise ValueError(f"model {plan.model.name!r} predicts {model.dataset.upper()} keypoints but dataset "
                             f"{plan.dataset_name!r} is {plan.dataset.format.upper()}")
        if split is not None and plan.options.boxes != "detector":
            from ditepose.service.jobs.shards import cached_eval_set

            eval_set = cached_eval_set(plan, model.input_size)
            ranges = shard_ranges(len(image_groups(eval_set.dataset)), plan.options.shard_size,
                                  plan.options.max_shards)
            if len(ranges) > 1:
                split(ranges)
                return None
        else:
            eval_set = load_dataset(plan, model.input_size, pool, timeout_s, lambda: between_batches(0.0))
        dataset = eval_set.dataset
        pipeline = pipeline_for(dataset, plan.options.flip_test, plan.options.decoder)
        t1 = time.perf_counter()
        infer = BatcherInfer(pool.batcher(model.name), timeout_s)
        predictions = predict(infer, dataset, pipeline, plan.options.batch_size, between_batches)
    t2 = time.perf_counter()
    doc = {"job_id": job_id, "model": plan.model.name, "dataset": plan.dataset_name, "format": plan.dataset.format,
           "options": plan.to_dict()["options"], "box_source": eval_set.box_source,
           "images": predictions_by_image(predictions)}
    atomic_write_text(out_file, json.dumps(doc))
    metrics = score(dataset, predictions, eval_set.gt_file)
    t3 = time.perf_counter()
    return {
        "metrics": metrics,
        "num_images": len(doc["images"]),
        "num_persons": len(dataset.records),
        **eval_set.describe(),
        "demo_weights": model.demo_weights,
        "input_size": list(model.input_size),
        "timings": {"load_s": t1 - t0, "inference_s": t2 - t1, "metric_s": t3 - t2},
    }


class JobRun:
    """One claimed run of a job: its lease, its checks between batches, its final transition."""

    def __init__(self, rec: JobRecord, store: JobStore, token: str, lease_ttl_s: float, soft_time_limit_s: float,
                 metrics: Any = None, dispatch: Callable[[list[str]], None] | None = None) -> None:
        self.rec, self.store, self.token, self.metrics = rec, store, token, metrics
        self.dispatch = dispatch
        self.soft_time_limit_s = soft_time_limit_s
        self.started = time.monotonic()
        self.lease = Lease(store, rec.id, token, lease_ttl_s)

    def between_batches(self, percent: float) -> None:
        self.lease.progress = percent
        self.lease.check()
        if self.lease.cancel_requested:
            raise JobCancelled("cancelled by request")
        if time.monotonic() - self.started > self.soft_time_limit_s:
            raise JobTimeLimit(f"soft time limit of {self.soft_time_limit_s:g} s exceeded")

    def execute(self, pool: WorkerPool, jobs_dir: Path) -> tuple[str, dict[str, Any]]:
        """(state, record fields): succeeded, cancelled, failed, lost (another worker took over), or split
        (the job's shards are queued; the last of them merges and finishes the job)."""
        from ditepose.service.jobs.shards import start_shards

        out_file = predictions_path(jobs_dir, self.rec.id)
        plan = JobPlan.from_dict(self.rec.plan)
        dispatch = self.dispatch

        def split(ranges: list[tuple[int, int]]) -> None:
            assert dispatch is not None
            start_shards(self.store, self.rec, self.token, plan, ranges, self.lease, dispatch)

        try:
            with self.lease:
                if plan.shards and dispatch is not None:  # split by an earlier run that died: queue them again
                    split(list(plan.shards))
                    return "split", {}
                try:
                    result = evaluate_plan(plan, self.rec.id, pool, out_file, self.between_batches,
                                           self.soft_time_limit_s, split if dispatch is not None else None)
                except DeadlineExceeded as exc:  # crops still waiting for the pool when the time was up
                    raise JobTimeLimit(f"soft time limit of {self.soft_time_limit_s:g} s exceeded") from exc
                if result is None:
                    return "split", {}
                self.lease.check()
        except LeaseLost:
            log.warning("job %s: lease lost (another worker took it over); dropping this run", self.rec.id)
            return "lost", {}
        except JobCancelled:
            return "cancelled", {}
        except Exception as exc:  # the job fails; the worker lives on
            log.exception("job %s failed", self.rec.id)
            return "failed", {"error": f"{type(exc).__name__}: {exc}"}
        return "succeeded", {"result": result, "progress": 100.0, "predictions": str(out_file)}

    def finish(self, state: str, fields: dict[str, Any]) -> str:
        """Compare-and-set the final state; 'lost' when the lease ran out before it could be recorded."""
        seconds = time.monotonic() - self.started
        if self.metrics is not None:
            self.metrics.job_stopped()
        if state in ("lost", "split"):
            return state
        if not self.store.transition(self.rec.id, ["running"], state, self.token, finished_at=time.time(), **fields):
            log.warning("job %s: lease expired before the result could be recorded; another run will", self.rec.id)
            return "lost"
        if self.metrics is not None:
            self.metrics.job_finished(state, seconds)
        return state


def run_job(
    job_id: str,
    store: JobStore,
    pool: WorkerPool,
    jobs_dir: Path,
    lease_ttl_s: float = 30.0,
    soft_time_limit_s: float = 3600.0,
    metrics: Any = None,
    worker: str | None = None,
    max_attempts: int = 3,
    dispatch: Callable[[list[str]], None] | None = None,
) -> str:
    """Claim and run one job on ``pool``; returns what happened: succeeded|failed|cancelled|split or
    done|busy|missing|lost. ``dispatch`` queues shard ids (:func:`~ditepose.service.jobs.shards.run_shard`
    each); without it a job is never split."""
    worker = worker or worker_name()
    token = uuid.uuid4().hex
    claim = store.claim(job_id, token, lease_ttl_s, worker)
    if claim != "run":
        log.info("job %s not run by %s: %s", job_id, worker, claim)
        if claim == "cancelled" and metrics is not None:
            metrics.job_finished("cancelled", 0.0)
        return claim
    rec = store.get(job_id)
    if rec is None:
        return "missing"
    if rec.attempts > max_attempts:  # e.g. a job whose worker dies every time (out of memory)
        error = f"gave up after {max_attempts} attempts (each one's worker died or stalled)"
        store.transition(job_id, ["running"], "failed", token, finished_at=time.time(), error=error)
        if metrics is not None:
            metrics.job_finished("failed", 0.0)
        return "failed"
    if metrics is not None:
        metrics.job_started()
    run = JobRun(rec, store, token, lease_ttl_s, soft_time_limit_s, metrics, dispatch)
    return run.finish(*run.execute(pool, jobs_dir))
