"""THE video segment task and the merge, shared by the Celery worker and the embedded threads.

Every video job is cut into segments by the API (:mod:`ditepose.service.jobs.video`); each segment
has a record of its own (a shard record: :func:`~ditepose.service.jobs.shards.shard_id`) and is one
task. A run claims its segment with a lease exactly as an evaluation shard does
(:mod:`ditepose.service.jobs.shards`), so a killed worker's segment is redelivered and redone once,
by whoever claims the lapsed lease, and a finished one is never run again. The segment runs through
the offline runner (:class:`~ditepose.service.video.offline.SegmentRunner`) with the pose crops and
the detector's device stage on the worker's pool as background work, and writes its tracks
(segment-local ids) to ``segments/<i>.json`` atomically. The run that sees every segment succeeded
claims the merge record, stitches the tracks (:func:`~ditepose.service.video.offline.finish_result`),
writes the result files and renders the video when asked; the job's final state is set once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditepose.model.keypoints import KeypointSpec, get_keypoint_spec
from ditepose.model.repository import file_sha256
from ditepose.service.batching.infer import BatcherInfer
from ditepose.service.batching.loaded_model import LoadedModel
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.jobs import runs
from ditepose.service.jobs.inputs import job_models, pool_detector
from ditepose.service.jobs.lease import Lease, LeaseLost
from ditepose.service.jobs.records import JobRecord, JobStore, atomic_write_text
from ditepose.service.jobs.shards import (
    claim_and_run_part,
    fail_job,
    merge_id,
    run_part_under_lease,
    shard_ids,
)
from ditepose.service.jobs.video import RESULT_FILES, VideoPlan
from ditepose.service.video.offline import PoseModel, SegmentRunner, VideoCancelled, finish_result
from ditepose.service.video.render import render_video
from ditepose.service.video.results import VideoResult, write_result
from ditepose.service.video.stitch import SegmentResult

log = logging.getLogger(__name__)
CHECK_EVERY_S = 0.5  # lease renewal and cancel check between frames, at most this often


@dataclass(frozen=True)
class ModelFacts:
    """What the merge reports of the model (no weights needed): name, version, keypoint layout."""

    name: str
    version: str
    spec: KeypointSpec


@functools.lru_cache(maxsize=16)
def _checkpoint_version(path: str) -> str:
    return "sha256:" + file_sha256(path)[:12]


def model_version(loaded: LoadedModel) -> str:
    """The checkpoint's sha256 (first 12 digits), as ``ditepose video`` reports it; else the served version."""
    if loaded.checkpoint and Path(loaded.checkpoint).is_file():
        return _checkpoint_version(str(loaded.checkpoint))
    return f"v{loaded.version}"


def segment_file(folder: str | Path, index: int) -> Path:
    return Path(folder) / "segments" / f"{index:04d}.json"


class _SegmentChecks:
    """Between frames: store progress, renew the lease, stop on a cancel of the segment or its job,
    or past the soft time limit (store round trips at most every :data:`CHECK_EVERY_S`)."""

    def __init__(self, store: JobStore, job_id: str, lease: Lease, plan: VideoPlan, index: int,
                 soft_time_limit_s: float) -> None:
        self.store, self.job_id, self.lease, self.limit_s = store, job_id, lease, soft_time_limit_s
        segment = plan.segment(index)
        self.first, self.frames = segment.run_start, max(segment.end - segment.run_start, 1)
        self.started, self.last = time.monotonic(), float("-inf")

    def on_frame(self, frame: int) -> None:
        self.lease.progress = 100.0 * (frame - self.first + 1) / self.frames

    def should_stop(self) -> bool:
        now = time.monotonic()
        if now - self.started > self.limit_s:
            raise runs.JobTimeLimit.after(self.limit_s)
        if now - self.last < CHECK_EVERY_S:
            return False
        self.last = now
        self.lease.check()
        job = self.store.get(self.job_id)
        return self.lease.cancel_requested or job is None or job.state != "running" or job.cancel_requested


def _run_segment(rec: JobRecord, plan: VideoPlan, pool: WorkerPool, checks: _SegmentChecks,
                 timeout_s: float) -> dict[str, Any]:
    """Run the segment's frames and write its file; returns the segment's result record."""
    job_id, index = str(rec.parent), int(rec.plan["index"])
    options = plan.video_options()
    t0 = time.perf_counter()
    with job_models.use(pool, plan, job_id) as loaded:
        model = PoseModel(plan.model.name, model_version(loaded), BatcherInfer(pool.batcher(loaded.name), timeout_s),
                          loaded.input_size, loaded.spec)
        detector = pool_detector(plan.detector, plan.det_score_thr, plan.detector_options, pool, timeout_s)
        t1 = time.perf_counter()
        result = SegmentRunner(model, detector, options).run(plan.video, plan.segment(index), None,
                                                             checks.on_frame, checks.should_stop)
    t2 = time.perf_counter()
    path = segment_file(plan.folder, index)
    atomic_write_text(path, json.dumps(result.to_dict()))
    return {"file": str(path), "tracks": len(result.tracks), "model_version": model.version,
            "dataset": loaded.dataset, "num_joints": loaded.num_joints, "load_s": t1 - t0, "inference_s": t2 - t1}


def _run_claimed_segment(rec: JobRecord, store: JobStore, token: str, pool: WorkerPool, lease_ttl_s: float,
                         soft_time_limit_s: float) -> str:
    job_id, index = str(rec.parent), int(rec.plan["index"])
    job = store.get(job_id)
    if job is None:
        store.transition(rec.id, ["running"], "failed", token, finished_at=time.time(), error="job record missing")
        return "failed"
    store.transition(job_id, ["queued"], "running", started_at=time.time())  # the first segment starts the job
    plan = VideoPlan.from_dict(job.plan)
    lease = Lease(store, rec.id, token, lease_ttl_s)
    checks = _SegmentChecks(store, job_id, lease, plan, index, soft_time_limit_s)
    segment = plan.segment(index)

    def work() -> dict[str, Any]:
        if checks.should_stop():
            raise VideoCancelled("the job is no longer running")
        return _run_segment(rec, plan, pool, checks, soft_time_limit_s)

    return run_part_under_lease(
        store, rec, token, lease, work, VideoCancelled, f"video segment {rec.id}",
        lambda error: f"segment {index} (frames {segment.start}-{segment.end}) failed: {error}", soft_time_limit_s)


def run_video_segment(sid: str, store: JobStore, pool: WorkerPool, lease_ttl_s: float = 30.0,
                      soft_time_limit_s: float = 3600.0, worker: str | None = None, max_attempts: int = 3) -> str:
    """Claim and run one segment, then merge the job if every segment is done (:func:`claim_and_run_part`)."""
    return claim_and_run_part(
        sid, store, pool, lease_ttl_s, worker, max_attempts, "segment",
        lambda rec, token: _run_claimed_segment(rec, store, token, pool, lease_ttl_s, soft_time_limit_s),
        lambda job_id, by: merge_video(job_id, store, lease_ttl_s, by))


def _write_atomically(result: VideoResult, path: Path, fmt: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_result(result, tmp, fmt)
    os.replace(tmp, path)


def _merge_files(job: JobRecord, segments: list[JobRecord], lease: Lease) -> dict[str, Any]:
    """Stitch the segments' tracks, write every result file; returns the job's result record."""
    plan = VideoPlan.from_dict(job.plan)
    t0 = time.perf_counter()
    parts = []
    for rec in segments:
        assert rec.result is not None
        parts.append(SegmentResult.from_dict(json.loads(Path(rec.result["file"]).read_text())))
    first = segments[0].result or {}
    facts = ModelFacts(plan.model.name, str(first["model_version"]), get_keypoint_spec(str(first["dataset"])))
    result = finish_result(plan.video_info, parts, facts, plan.video_options())
    folder = Path(plan.folder)
    for fmt in ("json", "csv", "coco"):
        _write_atomically(result, folder / RESULT_FILES[fmt], fmt)
    lease.check()
    t1 = time.perf_counter()
    if plan.options.get("render"):
        tmp = folder / f".render.{os.getpid()}.mp4"
        render_video(plan.video, result, facts.spec, tmp)
        os.replace(tmp, folder / RESULT_FILES["mp4"])
    split_at = job.started_at or job.created_at
    return {"tracks": len(result.tracks), "frames": result.video.frames, "rendered": bool(plan.options.get("render")),
            "model_version": facts.version,
            "timings": {"inference_s": max(r.finished_at or 0.0 for r in segments) - split_at,
                        "merge_s": t1 - t0, "render_s": time.perf_counter() - t1},
            "segments": [{"index": i, "frames": plan.segments[i], "worker": r.worker, "attempts": r.attempts,
                          "inference_s": (r.result or {}).get("inference_s")} for i, r in enumerate(segments)]}


def merge_video(job_id: str, store: JobStore, lease_ttl_s: float = 30.0, worker: str = "") -> str:
    """Finish the job once every segment succeeded: 'merged', 'waiting' (segments left), the merge
    claim's done|busy|cancelled|missing, or failed|lost."""
    job = store.get(job_id)
    if job is None or job.state != "running" or job.cancel_requested:
        return "waiting" if job is not None and job.state == "running" else "done"
    found = store.get_many(shard_ids(job))
    segments = [r for r in found if r is not None and r.state == "succeeded"]
    if len(segments) != len(found):
        return "waiting"
    claim, token, _ = runs.claim_run(store, merge_id(job_id), lease_ttl_s, worker)
    if claim != "run":
        return claim
    try:
        with Lease(store, merge_id(job_id), token, lease_ttl_s) as lease:
            result = _merge_files(job, segments, lease)
    except LeaseLost:
        return "lost"
    except Exception as exc:
        log.exception("merge of video job %s failed", job_id)
        error = f"merge failed: {type(exc).__name__}: {exc}"
        store.transition(merge_id(job_id), ["running"], "failed", token, finished_at=time.time(), error=error)
        fail_job(store, job_id, error)
        return "failed"
    result["merged_by"] = worker
    store.transition(job_id, ["running"], "succeeded", finished_at=time.time(), result=result, progress=100.0)
    store.transition(merge_id(job_id), ["running"], "succeeded", token, finished_at=time.time())
    return "merged"


def video_status(store: JobStore, job: JobRecord) -> tuple[JobRecord, int]:
    """(``job`` with live progress and segment counts, frames done): each segment's progress over the
    frames it runs, weighted by the frames it owns."""
    plan = VideoPlan.from_dict(job.plan)
    recs = store.get_many(shard_ids(job))
    counts = {"total": job.shards, **dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 0),
              "attempts": sum(r.attempts for r in recs if r is not None)}
    done = 0.0
    for i, rec in enumerate(recs):
        if rec is None:
            continue
        counts[rec.state] += 1
        _, start, end = plan.segments[i]
        fraction = 1.0 if rec.state == "succeeded" else rec.progress / 100.0 if rec.state == "running" else 0.0
        done += fraction * (end - start)
    job.shard_status = counts
    frames_done = plan.frames_total if job.state == "succeeded" else min(int(done), plan.frames_total)
    if job.state != "succeeded":
        job.progress = 100.0 * frames_done / max(plan.frames_total, 1)
    return job, frames_done
