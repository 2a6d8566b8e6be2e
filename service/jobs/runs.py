"""What a whole job's run and a shard's run share: the exceptions that stop them between batches,
the claim that starts them, and the predictions file and result that end them.

Both :mod:`ditepose.service.jobs.evaluation` (a job) and :mod:`ditepose.service.jobs.shards`
(a shard, and the merge of a sharded job) import this module; neither imports the other's
internals, so the two never need lazy imports of each other.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from ditepose.service.jobs.plan import JobPlan
from ditepose.service.jobs.records import Claim, JobStore, atomic_write_text
from ditepose.training.boxes import EvalSet
from ditepose.training.evaluate import Prediction, predictions_by_image


class JobCancelled(Exception):
    """A client asked to cancel; raised between batches."""


class JobTimeLimit(Exception):
    """The job ran past the soft time limit; raised between batches."""

    @classmethod
    def after(cls, soft_time_limit_s: float) -> JobTimeLimit:
        return cls(f"soft time limit of {soft_time_limit_s:g} s exceeded")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def predictions_path(jobs_dir: Path, job_id: str) -> Path:
    """One file per job id: a rerun of the same job replaces it, never duplicates it."""
    return jobs_dir / job_id / "predictions.json"


def claim_run(store: JobStore, record_id: str, lease_ttl_s: float, worker: str | None) -> tuple[Claim, str, str]:
    """(claim, lease token, worker name) for one run of a job, shard or merge record."""
    worker = worker or worker_name()
    token = uuid.uuid4().hex
    return store.claim(record_id, token, lease_ttl_s, worker), token, worker


def give_up_if_retried_too_often(store: JobStore, record_id: str, token: str, attempts: int, max_attempts: int) -> str:
    """The error recorded when a claimed record has run ``max_attempts`` times already (e.g. each
    worker died of memory), after failing the record; '' when it may run again."""
    if attempts <= max_attempts:
        return ""
    error = f"gave up after {max_attempts} attempts (each one's worker died or stalled)"
    store.transition(record_id, ["running"], "failed", token, finished_at=time.time(), error=error)
    return error


def write_predictions(out_file: Path, job_id: str, plan: JobPlan, eval_set: EvalSet,
                      predictions: list[Prediction]) -> int:
    """The job's predictions file, written atomically; returns how many images it holds."""
    images = predictions_by_image(predictions)
    doc = {"job_id": job_id, "model": plan.model.name, "dataset": plan.dataset_name, "format": plan.dataset.format,
           "options": plan.to_dict()["options"], "box_source": eval_set.box_source, "images": images}
    atomic_write_text(out_file, json.dumps(doc))
    return len(images)


def scored_result(metrics: dict[str, Any], num_images: int, eval_set: EvalSet, demo_weights: bool,
                  input_size: list[int], timings: dict[str, float]) -> dict[str, Any]:
    """A finished job's result record, the same for an unsharded job and a merged one."""
    return {
        "metrics": metrics,
        "num_images": num_images,
        "num_persons": len(eval_set.dataset.records),
        **eval_set.describe(),
        "demo_weights": demo_weights,
        "input_size": list(input_size),
        "timings": timings,
    }
