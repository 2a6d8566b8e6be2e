"""Sharded evaluation jobs: split, one task per shard, one merge that scores once.

A job over more than ``shard_size`` images is split by the run that claims it
(:func:`start_shards`): the plan records the image ranges (contiguous runs of
:func:`~ditepose.training.evaluate.image_groups`, so an image's persons stay together), and
each shard gets a record of its own in the job store (``parent`` = the job; not listed). A
shard record goes through the same claim / lease / compare-and-set as a job, so on an
at-least-once queue each shard *completes* once: a worker killed mid-shard leaves its lease to
run out and the redelivered task redoes that shard alone.

A shard writes its predictions atomically (temporary file, fsync, ``os.replace``) before it
records success, so a record that says 'succeeded' always points at a complete file. Whichever
shard task sees every shard succeeded claims the job's merge record (claimed like a job: once
at a time, done once); the merge reads each shard's file once, checks that every person of the
dataset is there exactly once, and scores with the same :func:`~ditepose.training.evaluate.score`
as an unsharded job. A shard task whose worker dies mid-merge is redelivered, finds its shard
done and claims the merge again, so a merge is never lost either.

Cancel flags the job and each shard: queued shards are cancelled at once, running ones stop at
their next batch, and the job becomes 'cancelled' when the last of them has stopped; it is
never merged. A shard that fails fails the job and cancels its siblings.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ditepose.service.batching.batcher import DeadlineExceeded
from ditepose.service.batching.infer import BatcherInfer
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.model_loader import LoadedModel
from ditepose.service.jobs.lease import Lease, LeaseLost
from ditepose.service.jobs.plan import JobPlan
from ditepose.service.jobs.records import TERMINAL, JobRecord, JobStore, atomic_write_text
from ditepose.training.boxes import EvalSet
from ditepose.training.evaluate import Prediction

log = logging.getLogger(__name__)

Dispatch = Callable[[list[str]], None]


def shard_id(job_id: str, index: int) -> str:
    return f"{job_id}-s{index:04d}"


def merge_id(job_id: str) -> str:
    return f"{job_id}-merge"


def shard_ids(job: JobRecord) -> list[str]:
    return [shard_id(job.id, i) for i in range(job.shards)]


def shard_file(jobs_dir: Path, job_id: str, index: int) -> Path:
    """One file per shard: a rerun of the shard replaces it, never adds a second one."""
    return jobs_dir / job_id / "shards" / f"shard-{index:04d}.json"


# ---------------------------------------------------------------------------------------------- datasets

_eval_sets: dict[str, EvalSet] = {}
_eval_sets_lock = threading.Lock()


def cached_eval_set(plan: JobPlan, input_size: tuple[int, int]) -> EvalSet:
    """The plan's dataset, loaded once per process (the shards of a job, and its merge, on one
    worker read the same annotation file once). Deterministic, so every worker's copy lists the same
    records in the same order. Never for boxes='detector' (those jobs are not split)."""
    from ditepose.service.jobs.evaluation import load_dataset

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


# ---------------------------------------------------------------------------------------------- models

class _JobModels:
    """A job's model stays in the worker's pool between its shards (a checkpoint load per shard would
    be most of the cost of sharding); the first shard of another job evicts it once no shard uses it.
    At most one idle job model per pool lingers after its job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, str], list[Any]] = {}  # (pool, job) -> [model, shards using it]

    @contextmanager
    def use(self, pool: WorkerPool, plan: JobPlan, job_id: str) -> Iterator[LoadedModel]:
        from ditepose.service.core.model_loader import load_model

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
                entry = self._entries[key] = [loaded, 0]
            entry[1] += 1
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1

    def _evict(self, pool: WorkerPool, keep: str) -> None:
        for key, (loaded, users) in list(self._entries.items()):
            if key[0] == id(pool) and key[1] != keep and users == 0:
                pool.remove_model(loaded.name)
                del self._entries[key]

    def release(self, pool: WorkerPool, job_id: str) -> None:
        """The job is over (merged, failed or cancelled): drop its model now if no shard uses it."""
        with self._lock:
            entry = self._entries.get((id(pool), job_id))
            if entry is not None and entry[1] == 0:
                pool.remove_model(entry[0].name)
                del self._entries[(id(pool), job_id)]


job_models = _JobModels()


# ------------------------------------------------------------------------------------------ shard files

def write_shard(path: Path, job_id: str, index: int, images: tuple[int, int], predictions: list[Prediction]) -> None:
    """Atomically: a reader sees no file or the whole file. Keypoints keep their dtype, so the merge
    scores exactly the arrays an unsharded run would have."""
    dtype = str(np.asarray(predictions[0]["keypoints"]).dtype) if predictions else "float32"
    doc = {
        "job_id": job_id, "index": index, "images": list(images), "persons": len(predictions), "dtype": dtype,
        "predictions": [{**p, "keypoints": np.asarray(p["keypoints"]).tolist()} for p in predictions],
    }
    atomic_write_text(path, json.dumps(doc))


def read_shard(path: Path, job_id: str, index: int, persons: int) -> list[Prediction]:
    """A shard's predictions, checked against its record (ValueError when the file is not that shard's)."""
    doc = json.loads(path.read_text())
    if doc.get("job_id") != job_id or doc.get("index") != index or doc.get("persons") != persons \
            or len(doc.get("predictions", [])) != persons:
        raise ValueError(f"{path}: not the complete predictions of shard {index} of job {job_id}")
    dtype = np.dtype(doc["dtype"])
    return [Prediction(**{**p, "keypoints": np.asarray(p["keypoints"], dtype=dtype)}) for p in doc["predictions"]]


# ------------------------------------------------------------------------------------------------ split

def start_shards(store: JobStore, rec: JobRecord, token: str, plan: JobPlan, ranges: list[tuple[int, int]],
                 lease: Lease, dispatch: Dispatch) -> None:
    """Record the split and queue the shards; idempotent (a redelivered job splits the same way and
    creates only the records that are missing). Runs under the job's lease."""
    ids = [shard_id(rec.id, i) for i in range(len(ranges))]
    existing = store.get_many([*ids, merge_id(rec.id)])
    for i, (sid, found) in enumerate(zip(ids, existing[:-1], strict=True)):
        if found is None:
            store.create(JobRecord(id=sid, parent=rec.id, plan={"index": i, "images": list(ranges[i])},
                                   request={"job": rec.id}))
    if existing[-1] is None:
        store.create(JobRecord(id=merge_id(rec.id), parent=rec.id, request={"job": rec.id}))
    stored = dict(plan.to_dict(), shards=[list(r) for r in ranges], split_at=time.time())
    if not store.transition(rec.id, ["running"], "running", token, plan=stored, shards=len(ranges)):
        raise LeaseLost(rec.id)
    lease.check()
    if lease.cancel_requested:  # a cancel that came while the job was being split
        cancel_shards(store, rec.id, len(ranges))
        finish_cancel(store, rec.id)
        return
    states = store.get_many(ids)
    dispatch([sid for sid, r in zip(ids, states, strict=True) if r is None or r.state not in TERMINAL])


def cancel_shards(store: JobStore, job_id: str, count: int) -> None:
    """Queued shards are cancelled now; running ones are flagged and stop at their next batch."""
    for i in range(count):
        store.request_cancel(shard_id(job_id, i))


def finish_cancel(store: JobStore, job_id: str) -> bool:
    """The job becomes 'cancelled' once a cancel was asked and none of its shards still runs."""
    job = store.get(job_id)
    if job is None or job.state != "running" or not job.cancel_requested or not job.shards:
        return False
    recs = store.get_many(shard_ids(job))
    if any(r is not None and r.state not in TERMINAL for r in recs):
        return False
    return store.transition(job_id, ["running"], "cancelled", finished_at=time.time())


def fail_job(store: JobStore, job_id: str, error: str) -> None:
    """One shard failed (or its merge): the job fails and its other shards stop."""
    job = store.get(job_id)
    if store.transition(job_id, ["running"], "failed", finished_at=time.time(), error=error) and job is not None:
        cancel_shards(store, job_id, job.shards)


def shard_status(store: JobStore, job: JobRecord) -> tuple[float, dict[str, int]]:
    """(progress in percent, counts by state): shards done out of the total, plus the persons done within
    the running ones."""
    recs = [r for r in store.get_many(shard_ids(job)) if r is not None]
    counts = {"total": job.shards, **{s: 0 for s in ("queued", "running", "succeeded", "failed", "cancelled")},
              "attempts": sum(r.attempts for r in recs)}
    done = 0.0
    for r in recs:
        counts[r.state] += 1
        done += 1.0 if r.state == "succeeded" else (r.progress / 100.0 if r.state == "running" else 0.0)
    return 100.0 * done / max(job.shards, 1), counts


# ------------------------------------------------------------------------------------------------ shards

class ShardStopped(Exception):
    """The shard's job was cancelled (or ended otherwise); raised between batches."""


def _run_claimed_shard(rec: JobRecord, store: JobStore, token: str, pool: WorkerPool, jobs_dir: Path,
                       lease_ttl_s: float, soft_time_limit_s: float) -> str:
    from ditepose.service.jobs.evaluation import JobTimeLimit
    from ditepose.training.evaluate import image_groups, pipeline_for, predict

    job_id, index = str(rec.parent), int(rec.plan["index"])
    start, stop = (int(v) for v in rec.plan["images"])
    started = time.monotonic()
    lease = Lease(store, rec.id, token, lease_ttl_s)

    def job_stopped() -> bool:
        job = store.get(job_id)
        return job is None or job.state != "running" or job.cancel_requested

    def between_batches(percent: float) -> None:
        lease.progress = percent
        lease.check()
        if lease.cancel_requested or job_stopped():
            raise ShardStopped("cancelled by request")
        if time.monotonic() - started > soft_time_limit_s:
            raise JobTimeLimit(f"soft time limit of {soft_time_limit_s:g} s exceeded")

    try:
        with lease:
            try:
                job = store.get(job_id)
                if job is None or job_stopped():
                    raise ShardStopped("the job is no longer running")
                plan = JobPlan.from_dict(job.plan)
                t0 = time.perf_counter()
                with job_models.use(pool, plan, job_id) as model:
                    eval_set = cached_eval_set(plan, model.input_size)
                    dataset = eval_set.dataset
                    pipeline = pipeline_for(dataset, plan.options.flip_test, plan.options.decoder)
                    groups = image_groups(dataset)[start:stop]
                    t1 = time.perf_counter()
                    predictions = predict(BatcherInfer(pool.batcher(model.name), soft_time_limit_s), dataset,
                                          pipeline, plan.options.batch_size, between_batches, images=groups)
                    input_size = list(model.input_size)
                    demo = model.demo_weights
                t2 = time.perf_counter()
                path = shard_file(jobs_dir, job_id, index)
                write_shard(path, job_id, index, (start, stop), predictions)
                lease.check()
            except DeadlineExceeded as exc:
                raise JobTimeLimit(f"soft time limit of {soft_time_limit_s:g} s exceeded") from exc
    except LeaseLost:
        log.warning("shard %s: lease lost (another worker took it over); dropping this run", rec.id)
        return "lost"
    except ShardStopped:
        store.transition(rec.id, ["running"], "cancelled", token, finished_at=time.time())
        return "cancelled"
    except Exception as exc:
        log.exception("shard %s failed", rec.id)
        error = f"{type(exc).__name__}: {exc}"
        store.transition(rec.id, ["running"], "failed", token, finished_at=time.time(), error=error)
        fail_job(store, job_id, f"shard {index} (images {start}-{stop}) failed: {error}")
        return "failed"
    result = {"file": str(path), "persons": len(predictions), "images": stop - start, "input_size": input_size,
              "demo_weights": demo, "load_s": t1 - t0, "inference_s": t2 - t1}
    if not store.transition(rec.id, ["running"], "succeeded", token, finished_at=time.time(), progress=100.0,
                            result=result):
        log.warning("shard %s: lease expired before the result could be recorded; another run will", rec.id)
        return "lost"
    return "succeeded"


def run_shard(
    sid: str,
    store: JobStore,
    pool: WorkerPool,
    jobs_dir: Path,
    lease_ttl_s: float = 30.0,
    soft_time_limit_s: float = 3600.0,
    worker: str | None = None,
    max_attempts: int = 3,
) -> str:
    """Claim and run one shard, then merge the job if every shard is done. Returns succeeded|failed|
    cancelled|lost or the claim's done|busy|missing; 'busy' also when the merge is held by a live worker
    (the caller tries again later: that worker may still die)."""
    from ditepose.service.jobs.evaluation import worker_name

    worker = worker or worker_name()
    token = uuid.uuid4().hex
    claim = store.claim(sid, token, lease_ttl_s, worker)
    rec = store.get(sid)
    if rec is None or rec.parent is None:
        return "missing"
    if claim == "run":
        if rec.attempts > max_attempts:
            error = f"gave up after {max_attempts} attempts (each one's worker died or stalled)"
            store.transition(sid, ["running"], "failed", token, finished_at=time.time(), error=error)
            fail_job(store, rec.parent, f"shard {rec.plan['index']}: {error}")
            return "failed"
        outcome = _run_claimed_shard(rec, store, token, pool, jobs_dir, lease_ttl_s, soft_time_limit_s)
    else:
        outcome = claim
        log.info("shard %s not run by %s: %s", sid, worker, claim)
    if outcome in ("succeeded", "done") and merge(rec.parent, store, jobs_dir, lease_ttl_s, worker) == "busy":
        return "busy"
    if outcome in ("cancelled", "done"):
        finish_cancel(store, rec.parent)
    job = store.get(rec.parent)
    if job is None or job.state in TERMINAL:
        job_models.release(pool, rec.parent)
    return outcome


# ------------------------------------------------------------------------------------------------- merge

def merge(job_id: str, store: JobStore, jobs_dir: Path, lease_ttl_s: float = 30.0, worker: str = "") -> str:
    """Score the job once every shard succeeded: 'merged', 'waiting' (shards left), or the merge claim's
    done|busy|cancelled|missing, or failed|lost."""
    from ditepose.service.jobs.evaluation import predictions_path
    from ditepose.training.evaluate import predictions_by_image, score

    job = store.get(job_id)
    if job is None or job.state != "running" or not job.shards or job.cancel_requested:
        return "waiting" if job is not None and job.state == "running" else "done"
    shards = store.get_many(shard_ids(job))
    if any(r is None or r.state != "succeeded" for r in shards):
        return "waiting"
    token = uuid.uuid4().hex
    claim = store.claim(merge_id(job_id), token, lease_ttl_s, worker)
    if claim != "run":
        return claim
    t0 = time.perf_counter()
    try:
        with Lease(store, merge_id(job_id), token, lease_ttl_s) as lease:
            predictions: list[Prediction] = []
            for i, rec in enumerate(shards):
                assert rec is not None and rec.result is not None
                predictions += read_shard(Path(rec.result["file"]), job_id, i, int(rec.result["persons"]))
            plan = JobPlan.from_dict(job.plan)
            first = shards[0].result  # type: ignore[union-attr]
            eval_set = cached_eval_set(plan, tuple(first["input_size"]))
            dataset = eval_set.dataset
            ids = sorted(p["bbox_id"] for p in predictions)
            if ids != list(range(len(dataset.records))):  # every person once: none missing, none twice
                raise ValueError(f"the shards hold {len(ids)} predictions ({len(set(ids))} distinct) for "
                                 f"{len(dataset.records)} persons")
            predictions.sort(key=lambda p: p["bbox_id"])
            out_file = predictions_path(jobs_dir, job_id)
            doc = {"job_id": job_id, "model": plan.model.name, "dataset": plan.dataset_name,
                   "format": plan.dataset.format, "options": plan.to_dict()["options"],
                   "box_source": eval_set.box_source, "images": predictions_by_image(predictions)}
            atomic_write_text(out_file, json.dumps(doc))
            metrics = score(dataset, predictions, eval_set.gt_file)
            lease.check()
    except LeaseLost:
        return "lost"
    except Exception as exc:
        log.exception("merge of job %s failed", job_id)
        error = f"merge failed: {type(exc).__name__}: {exc}"
        store.transition(merge_id(job_id), ["running"], "failed", token, finished_at=time.time(), error=error)
        fail_job(store, job_id, error)
        return "failed"
    t1 = time.perf_counter()
    finished = [r.finished_at or 0.0 for r in shards if r is not None]
    split_at = float(job.plan.get("split_at", job.started_at or time.time()))
    result = {
        "metrics": metrics,
        "num_images": len(doc["images"]),
        "num_persons": len(dataset.records),
        **eval_set.describe(),
        "demo_weights": first["demo_weights"],
        "input_size": list(first["input_size"]),
        "timings": {"load_s": split_at - (job.started_at or split_at), "inference_s": max(finished) - split_at,
                    "metric_s": t1 - t0},
        "shards": [{"index": i, "images": r.plan["images"], "persons": r.result["persons"], "worker": r.worker,
                    "attempts": r.attempts, "inference_s": r.result["inference_s"]}
                   for i, r in enumerate(shards) if r is not None and r.result is not None],
        "merged_by": worker,
    }
    store.transition(job_id, ["running"], "succeeded", finished_at=time.time(), result=result, progress=100.0,
                     predictions=str(out_file))
    store.transition(merge_id(job_id), ["running"], "succeeded", token, finished_at=time.time())
    return "merged"


def status_of(store: JobStore, job: JobRecord) -> JobRecord:
    """``job`` with its live progress and shard counts (a sharded job that is still running)."""
    if job.shards and job.state == "running":
        job.progress, job.shard_status = shard_status(store, job)
    elif job.shards:
        job.shard_status = shard_status(store, job)[1]
    return job
