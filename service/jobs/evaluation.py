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
runs on the same pool as background batches (:class:`~ditepose.service.jobs.inputs.PoolDetector`);
the result records them (``box_source``) and, for a detector, adds its report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ditepose.service.batching.batcher import DeadlineExceeded
from ditepose.service.batching.infer import BatcherInfer
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.jobs.inputs import cached_eval_set, load_dataset, model_in_pool
from ditepose.service.jobs.lease import Lease, LeaseLost
from ditepose.service.jobs.plan import JobPlan, shard_ranges
from ditepose.service.jobs.records import JobRecord, JobStore
from ditepose.service.jobs.runs import (
    JobCancelled,
    JobTimeLimit,
    claim_run,
    give_up_if_retried_too_often,
    predictions_path,
    scored_result,
    write_predictions,
)
from ditepose.service.jobs.shards import start_shards
from ditepose.training.evaluate import image_groups, pipeline_for, predict, score

log = logging.getLogger(__name__)

Progress = Callable[[float], None]


Split = Callable[[list[tuple[int, int]]], None]


def evaluate_plan(
    plan: JobPlan, job_id: str, pool: WorkerPool, out_file: Path, between_batches: Progress, timeout_s: float,
    split: Split | None = None,
) -> dict[str, Any] | None:
    """Run one job end to end on ``pool``; returns the job result (metrics, counts, timings).

    With ``split`` (a queue for shards), a job over more than ``shard_size`` images is handed to it
    as image ranges instead (:mod:`ditepose.service.jobs.shards`), and None is returned."""
    t0 = time.perf_counter()
    if not plan.dataset.ann_file.is_file():  # bad data fails before the model loads
        raise FileNotFoundError(f"annotation file not found: {plan.dataset.ann_file}")
    with model_in_pool(pool, plan, job_id) as model:
        if model.dataset != plan.dataset.format:
            raise ValueError(f"model {plan.model.name!r} predicts {model.dataset.upper()} keypoints but dataset "
                             f"{plan.dataset_name!r} is {plan.dataset.format.upper()}")
        if split is not None and plan.options.boxes != "detector":
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
    num_images = write_predictions(out_file, job_id, plan, eval_set, predictions)
    metrics = score(dataset, predictions, eval_set.gt_file)
    t3 = time.perf_counter()
    return scored_result(metrics, num_images, eval_set, model.demo_weights, list(model.input_size),
                         {"load_s": t1 - t0, "inference_s": t2 - t1, "metric_s": t3 - t2})


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
            raise JobTimeLimit.after(self.soft_time_limit_s)

    def execute(self, pool: WorkerPool, jobs_dir: Path) -> tuple[str, dict[str, Any]]:
        """(state, record fields): succeeded, cancelled, failed, lost (another worker took over), or split
        (the job's shards are queued; the last of them merges and finishes the job)."""
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
                    raise JobTimeLimit.after(self.soft_time_limit_s) from exc
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
    claim, token, worker = claim_run(store, job_id, lease_ttl_s, worker)
    if claim != "run":
        log.info("job %s not run by %s: %s", job_id, worker, claim)
        if claim == "cancelled" and metrics is not None:
            metrics.job_finished("cancelled", 0.0)
        return claim
    rec = store.get(job_id)
    if rec is None:
        return "missing"
    if give_up_if_retried_too_often(store, job_id, token, rec.attempts, max_attempts):
        if metrics is not None:
            metrics.job_finished("failed", 0.0)
        return "failed"
    if metrics is not None:
        metrics.job_started()
    run = JobRun(rec, store, token, lease_ttl_s, soft_time_limit_s, metrics, dispatch)
    return run.finish(*run.execute(pool, jobs_dir))
