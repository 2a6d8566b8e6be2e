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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from ditepose.service.batching.batcher import DeadlineExceeded
from ditepose.service.batching.infer import BatcherInfer
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.jobs import runs
from ditepose.service.jobs.inputs import cached_eval_set, job_models
from ditepose.service.jobs.lease import Lease, LeaseLost
from ditepose.service.jobs.plan import JobPlan
from ditepose.service.jobs.records import TERMINAL, JobRecord, JobStore, atomic_write_text
from ditepose.training.evaluate import Prediction, image_groups, pipeline_for, predict, score

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
    return [cast(Prediction, {**p, "keypoints": np.asarray(p["keypoints"], dtype=dtype)}) for p in doc["predictions"]]


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


def _job_stopped(store: JobStore, job_id: str) -> bool:
    job = store.get(job_id)
    return job is None or job.state != "running" or job.cancel_requested


def _shard_checks(store: JobStore, job_id: str, lease: Lease, soft_time_limit_s: float) -> Callable[[float], None]:
    """What a shard checks between batches: its lease, a cancel of it or its job, the time limit."""
    started = time.monotonic()

    def between_batches(percent: float) -> None:
        lease.progress = percent
        lease.check()
        if lease.cancel_requested or _job_stopped(store, job_id):
            raise ShardStopped("cancelled by request")
        if time.monotonic() - started > soft_time_limit_s:
            raise runs.JobTimeLimit.after(soft_time_limit_s)

    return between_batches


def _predict_shard(rec: JobRecord, store: JobStore, pool: WorkerPool, jobs_dir: Path,
                   between_batches: Callable[[float], None], soft_time_limit_s: float) -> dict[str, Any]:
    """Predict the shard's images and write its file; returns the shard's result record."""
    job_id, index = str(rec.parent), int(rec.plan["index"])
    start, stop = (int(v) for v in rec.plan["images"])
    job = store.get(job_id)
    if job is None or _job_stopped(store, job_id):
        raise ShardStopped("the job is no longer running")
    plan = JobPlan.from_dict(job.plan)
    t0 = time.perf_counter()
    with job_models.use(pool, plan, job_id) as model:
        dataset = cached_eval_set(plan, model.input_size).dataset
        pipeline = pipeline_for(dataset, plan.options.flip_test, plan.options.decoder)
        groups = image_groups(dataset)[start:stop]
        t1 = time.perf_counter()
        predictions = predict(BatcherInfer(pool.batcher(model.name), soft_time_limit_s), dataset,
                              pipeline, plan.options.batch_size, between_batches, images=groups)
    t2 = time.perf_counter()
    path = shard_file(jobs_dir, job_id, index)
    write_shard(path, job_id, index, (start, stop), predictions)
    return {"file": str(path), "persons": len(predictions), "images": stop - start,
            "input_size": list(model.input_size), "demo_weights": model.demo_weights,
            "load_s": t1 - t0, "inference_s": t2 - t1}


def run_part_under_lease(store: JobStore, rec: JobRecord, token: str, lease: Lease,
                         work: Callable[[], dict[str, Any]], stopped: type[Exception], what: str,
                         failure: Callable[[str], str], soft_time_limit_s: float) -> str:
    """One claimed part of a job (an evaluation shard, a video segment) run under its lease, its record
    following the outcome: 'succeeded' with ``work()``'s result; 'cancelled' when ``work`` raises
    ``stopped``; 'failed' on any other error, failing the whole job with ``failure(error)`` (which part
    broke); 'lost' when the lease went to another worker, whose run then counts. One function, so
    shards and segments recover from a dead worker the same way."""
    try:
        with lease:
            try:
                result = work()
                lease.check()
            except DeadlineExceeded as exc:
                raise runs.JobTimeLimit.after(soft_time_limit_s) from exc
    except LeaseLost:
        log.warning("%s: lease lost (another worker took it over); dropping this run", what)
        return "lost"
    except stopped:
        store.transition(rec.id, ["running"], "cancelled", token, finished_at=time.time())
        return "cancelled"
    except Exception as exc:
        log.exception("%s failed", what)
        error = f"{type(exc).__name__}: {exc}"
        store.transition(rec.id, ["running"], "failed", token, finished_at=time.time(), error=error)
        fail_job(store, str(rec.parent), failure(error))
        return "failed"
    if not store.transition(rec.id, ["running"], "succeeded", token, finished_at=time.time(), progress=100.0,
                            result=result):
        log.warning("%s: lease expired before the result could be recorded; another run will", what)
        return "lost"
    return "succeeded"


def _run_claimed_shard(rec: JobRecord, store: JobStore, token: str, pool: WorkerPool, jobs_dir: Path,
                       lease_ttl_s: float, soft_time_limit_s: float) -> str:
    job_id, index = str(rec.parent), int(rec.plan["index"])
    lease = Lease(store, rec.id, token, lease_ttl_s)
    between_batches = _shard_checks(store, job_id, lease, soft_time_limit_s)
    start, stop = rec.plan["images"]
    return run_part_under_lease(
        store, rec, token, lease,
        lambda: _predict_shard(rec, store, pool, jobs_dir, between_batches, soft_time_limit_s),
        ShardStopped, f"shard {rec.id}", lambda error: f"shard {index} (images {start}-{stop}) failed: {error}",
        soft_time_limit_s)


def claim_and_run_part(sid: str, store: JobStore, pool: WorkerPool, lease_ttl_s: float, worker: str | None,
                       max_attempts: int, part: str, run_claimed: Callable[[JobRecord, str], str],
                       merge_job: Callable[[str, str], str]) -> str:
    """Claim one part of a job (``part``, as messages name it: 'shard', 'segment'), run it with ``run_claimed(rec, token)``
    and merge the job with ``merge_job(job_id, worker)`` if every part is done. Returns succeeded|failed|
    cancelled|lost or the claim's done|busy|missing; 'busy' also when the merge is held by a live worker
    (the caller tries again later: that worker may still die). One function, so evaluation shards and
    video segments are claimed, retried, merged and released the same way."""
    claim, token, worker = runs.claim_run(store, sid, lease_ttl_s, worker)
    rec = store.get(sid)
    if rec is None or rec.parent is None:
        return "missing"
    if claim == "run":
        error = runs.give_up_if_retried_too_often(store, sid, token, rec.attempts, max_attempts)
        if error:
            fail_job(store, rec.parent, f"{part} {rec.plan['index']}: {error}")
            return "failed"
        outcome = run_claimed(rec, token)
    else:
        outcome = claim
        log.info("%s %s not run by %s: %s", part, sid, worker, claim)
    if outcome in ("succeeded", "done") and merge_job(rec.parent, worker) == "busy":
        return "busy"
    if outcome in ("cancelled", "done"):
        finish_cancel(store, rec.parent)
    job = store.get(rec.parent)
    if job is None or job.state in TERMINAL:
        job_models.release(pool, rec.parent)
    return outcome


def run_shard(sid: str, store: JobStore, pool: WorkerPool, jobs_dir: Path, lease_ttl_s: float = 30.0,
              soft_time_limit_s: float = 3600.0, worker: str | None = None, max_attempts: int = 3) -> str:
    """Claim and run one evaluation shard, then merge the job if every shard is done
    (:func:`claim_and_run_part`)."""
    return claim_and_run_part(
        sid, store, pool, lease_ttl_s, worker, max_attempts, "shard",
        lambda rec, token: _run_claimed_shard(rec, store, token, pool, jobs_dir, lease_ttl_s, soft_time_limit_s),
        lambda job_id, by: merge(job_id, store, jobs_dir, lease_ttl_s, by))


# ------------------------------------------------------------------------------------------------- merge

def _merged_predictions(job: JobRecord, shards: list[JobRecord]) -> list[Prediction]:
    """Every shard's predictions in person order, checked: every person of the dataset once."""
    predictions: list[Prediction] = []
    for i, rec in enumerate(shards):
        if rec.result is None:
            raise ValueError(f"shard {i} of job {job.id} succeeded without a result")
        predictions += read_shard(Path(rec.result["file"]), job.id, i, int(rec.result["persons"]))
    return sorted(predictions, key=lambda p: p["bbox_id"])


def _score_merged(job: JobRecord, shards: list[JobRecord], out_file: Path, lease: Lease) -> dict[str, Any]:
    """Write the job's predictions file from its shards' files and score it; returns the job result."""
    t0 = time.perf_counter()
    predictions = _merged_predictions(job, shards)
    plan = JobPlan.from_dict(job.plan)
    first: dict[str, Any] = shards[0].result or {}
    eval_set = cached_eval_set(plan, tuple(first["input_size"]))
    dataset = eval_set.dataset
    ids = [p["bbox_id"] for p in predictions]
    if ids != list(range(len(dataset.records))):  # every person once: none missing, none twice
        raise ValueError(f"the shards hold {len(ids)} predictions ({len(set(ids))} distinct) for "
                         f"{len(dataset.records)} persons")
    num_images = runs.write_predictions(out_file, job.id, plan, eval_set, predictions)
    metrics = score(dataset, predictions, eval_set.gt_file)
    lease.check()
    finished = [r.finished_at or 0.0 for r in shards]
    split_at = float(job.plan.get("split_at", job.started_at or time.time()))
    timings = {"load_s": split_at - (job.started_at or split_at), "inference_s": max(finished) - split_at,
               "metric_s": time.perf_counter() - t0}
    result = runs.scored_result(metrics, num_images, eval_set, first["demo_weights"], first["input_size"], timings)
    result["shards"] = [{"index": i, "images": r.plan["images"], "persons": r.result["persons"], "worker": r.worker,
                         "attempts": r.attempts, "inference_s": r.result["inference_s"]}
                        for i, r in enumerate(shards) if r.result is not None]
    return result


def merge(job_id: str, store: JobStore, jobs_dir: Path, lease_ttl_s: float = 30.0, worker: str = "") -> str:
    """Score the job once every shard succeeded: 'merged', 'waiting' (shards left), or the merge claim's
    done|busy|cancelled|missing, or failed|lost."""
    job = store.get(job_id)
    if job is None or job.state != "running" or not job.shards or job.cancel_requested:
        return "waiting" if job is not None and job.state == "running" else "done"
    found = store.get_many(shard_ids(job))
    shards = [r for r in found if r is not None and r.state == "succeeded"]
    if len(shards) != len(found):
        return "waiting"
    claim, token, _ = runs.claim_run(store, merge_id(job_id), lease_ttl_s, worker)
    if claim != "run":
        return claim
    out_file = runs.predictions_path(jobs_dir, job_id)
    try:
        with Lease(store, merge_id(job_id), token, lease_ttl_s) as lease:
            result = _score_merged(job, shards, out_file, lease)
    except LeaseLost:
        return "lost"
    except Exception as exc:
        log.exception("merge of job %s failed", job_id)
        error = f"merge failed: {type(exc).__name__}: {exc}"
        store.transition(merge_id(job_id), ["running"], "failed", token, finished_at=time.time(), error=error)
        fail_job(store, job_id, error)
        return "failed"
    result["merged_by"] = worker
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
