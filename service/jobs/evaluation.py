"""THE evaluation task body, shared by the Celery worker and the embedded thread executor.

:func:`run_job` owns the job's life cycle (claim with a lease, run, compare-and-set the final
state); :func:`evaluate_plan` is the work itself: load the model like the service does, run
the dataset through :class:`model.pipeline.TopDownPipeline` batch by batch (progress,
cancellation and the soft time limit are checked between batches), write the predictions
file atomically and score it with training's ``evaluate_coco`` / ``evaluate_mpii``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditepose.service.jobs.lease import Lease, LeaseLost
from ditepose.service.jobs.records import JobStore, atomic_write_text
from ditepose.service.jobs.samples import EvalSet, ImageSample, load_eval_set

log = logging.getLogger(__name__)

Progress = Callable[[float], None]


class JobCancelled(Exception):
    """A client asked to cancel; raised between batches."""


class JobTimeLimit(Exception):
    """The job ran past the soft time limit; raised between batches."""


@dataclass(frozen=True)
class JobModel:
    module: torch.nn.Module
    arch: str
    dataset: str
    num_joints: int
    input_size: tuple[int, int]
    demo_weights: bool


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def predictions_path(jobs_dir: Path, job_id: str) -> Path:
    """One file per job id: a rerun of the same job replaces it, never duplicates it."""
    return jobs_dir / job_id / "predictions.json"


def load_job_model(ref: dict[str, Any]) -> JobModel:
    """Our checkpoint format (metadata inside) or the authors' mmpose layout with the plan's arch/dataset."""
    from ditepose import model as models
    from ditepose.model.checkpoint import DEFAULT_INPUT_SIZE
    from ditepose.model.keypoints import get_keypoint_spec

    override = tuple(ref["input_size"]) if ref.get("input_size") else None
    path = ref.get("checkpoint") or models.default_checkpoint_path()
    if path is None:
        log.warning("model %r has no checkpoint: evaluating RANDOM demo weights (seed 0)", ref.get("name"))
        torch.manual_seed(0)
        num_joints = get_keypoint_spec(ref["dataset"]).num_joints
        module = models.build_model(ref["arch"], num_joints=num_joints)
        size = override or DEFAULT_INPUT_SIZE[ref["dataset"]]
        return JobModel(module.eval(), ref["arch"], ref["dataset"], num_joints, tuple(size), True)
    try:
        module, meta = models.load_pose_model(Path(path), map_location="cpu")
    except (KeyError, ValueError, TypeError) as exc:
        log.info("%s is not in our checkpoint format (%s); reading it as an mmpose checkpoint", path, exc)
        num_joints = get_keypoint_spec(ref["dataset"]).num_joints
        module = models.build_model(ref["arch"], num_joints=num_joints)
        models.load_checkpoint(module, Path(path))
        size = override or DEFAULT_INPUT_SIZE[ref["dataset"]]
        return JobModel(module.eval(), ref["arch"], ref["dataset"], num_joints, tuple(size), False)
    size = override or (int(meta.input_size[0]), int(meta.input_size[1]))
    return JobModel(module.eval(), meta.arch, meta.dataset, int(meta.num_joints), size, False)


def make_infer(module: torch.nn.Module, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The service's engine factory (``model.engine.InferenceEngine`` when present), always fp32."""
    from ditepose.service.batching.infer import make_infer as service_make_infer

    return service_make_infer(module, device, "fp32")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path.name}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _batches(images: list[ImageSample], persons_per_batch: int) -> list[list[ImageSample]]:
    """Whole images grouped until a batch holds at least ``persons_per_batch`` persons."""
    out: list[list[ImageSample]] = [[]]
    count = 0
    for sample in images:
        if count >= persons_per_batch:
            out.append([])
            count = 0
        out[-1].append(sample)
        count += len(sample.boxes)
    return [b for b in out if b]


def run_set(
    infer: Callable[[torch.Tensor], torch.Tensor],
    pipeline: Any,
    eval_set: EvalSet,
    batch_size: int,
    between_batches: Progress,
) -> list[dict[str, Any]]:
    """Per-image predictions; ``between_batches(percent)`` may raise to stop (cancel, time limit)."""
    total = max(eval_set.num_persons, 1)
    done = 0
    out: list[dict[str, Any]] = []
    for batch in _batches(eval_set.images, batch_size):
        prepared = [pipeline.prepare(_read_rgb(s.file), s.boxes, s.scores) for s in batch]
        crops = torch.cat([p.crops for p in prepared]) if prepared else torch.zeros(0)
        heatmaps = torch.cat([torch.as_tensor(infer(crops[i : i + batch_size])).float().cpu()
                              for i in range(0, len(crops), batch_size)])
        start = 0
        for sample, prep in zip(batch, prepared, strict=True):
            n = len(prep.crops)
            persons = pipeline.finish(prep, heatmaps[start : start + n])
            start += n
            out.append({
                "image_id": sample.image_id,
                "file_name": sample.file.name,
                "persons": [
                    {"id": pid, "bbox": [float(v) for v in p.bbox_xywh], "box_score": float(score),
                     "score": float(p.score), "area": float(p.area),
                     "keypoints": np.asarray(p.keypoints, dtype=np.float64).tolist()}
                    for pid, score, p in zip(sample.ids, sample.scores, persons, strict=True)
                ],
            })
            done += len(persons)
        between_batches(100.0 * done / total)
    return out


def score_predictions(eval_set: EvalSet, images: list[dict[str, Any]]) -> dict[str, float]:
    """COCO AP table or MPII PCKh table, by training's metric code."""
    persons = [(img["image_id"], p) for img in images for p in img["persons"]]
    if eval_set.format == "coco":
        from ditepose.training.coco_eval import evaluate_coco

        preds = [{"image_id": image_id, "keypoints": np.asarray(p["keypoints"]), "box_score": p["box_score"],
                  "area": p["area"], "bbox_id": p["id"]} for image_id, p in persons]
        return evaluate_coco(preds, eval_set.coco, img_ids=eval_set.img_ids)
    from ditepose.training.mpii_eval import evaluate_mpii

    ordered = sorted((p for _, p in persons), key=lambda p: p["id"])
    return evaluate_mpii(np.stack([np.asarray(p["keypoints"])[:, :2] for p in ordered]), eval_set.mpii_gt)


def evaluate_plan(plan: dict[str, Any], out_file: Path, between_batches: Progress, device: str = "auto") -> dict:
    """Run one resolved request end to end; returns the job result (metrics, counts, timings)."""
    from ditepose.model.keypoints import get_keypoint_spec
    from ditepose.model.pipeline import TopDownPipeline

    t0 = time.perf_counter()
    opts, dataset = plan["options"], plan["dataset"]
    # bad data fails before the model loads
    eval_set = load_eval_set(dataset, bool(opts["use_gt_boxes"]), opts.get("max_images"))
    job_model = load_job_model(plan["model"])
    if job_model.dataset != dataset["format"]:
        raise ValueError(f"model {plan['model']['name']!r} predicts {job_model.dataset.upper()} keypoints but "
                         f"dataset {dataset['name']!r} is {dataset['format'].upper()}")
    infer = make_infer(job_model.module, resolve_device(device))
    pipeline = TopDownPipeline(job_model.input_size, get_keypoint_spec(job_model.dataset),
                               flip_test=bool(opts["flip_test"]), decoder=opts["decoder"])
    t1 = time.perf_counter()
    images = run_set(infer, pipeline, eval_set, int(opts["batch_size"]), between_batches)
    t2 = time.perf_counter()
    doc = {"job_id": plan["job_id"], "model": plan["model"]["name"], "dataset": dataset["name"],
           "format": eval_set.format, "options": opts, "images": images}
    atomic_write_text(out_file, json.dumps(doc))
    metrics = score_predictions(eval_set, images)
    t3 = time.perf_counter()
    return {
        "metrics": metrics,
        "num_images": len(images),
        "num_persons": eval_set.num_persons,
        "demo_weights": job_model.demo_weights,
        "input_size": list(job_model.input_size),
        "timings": {"load_s": t1 - t0, "inference_s": t2 - t1, "metric_s": t3 - t2},
    }


def run_job(
    job_id: str,
    store: JobStore,
    jobs_dir: Path,
    lease_ttl_s: float = 30.0,
    soft_time_limit_s: float = 3600.0,
    metrics: Any = None,
    worker: str | None = None,
    max_attempts: int = 3,
    device: str = "auto",
) -> str:
    """Claim and run one job; returns what happened: succeeded|failed|cancelled or done|busy|missing|lost."""
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
    started = time.monotonic()
    lease = Lease(store, job_id, token, lease_ttl_s)
    if metrics is not None:
        metrics.job_started()

    def between_batches(percent: float) -> None:
        lease.progress = percent
        lease.check()
        if lease.cancel_requested:
            raise JobCancelled("cancelled by request")
        if time.monotonic() - started > soft_time_limit_s:
            raise JobTimeLimit(f"soft time limit of {soft_time_limit_s:g} s exceeded")

    state, fields = "failed", {}
    try:
        with lease:
            result = evaluate_plan({**rec.plan, "job_id": job_id}, predictions_path(jobs_dir, job_id),
                                   between_batches, device)
            lease.check()
        state = "succeeded"
        fields = {"result": result, "progress": 100.0, "predictions": str(predictions_path(jobs_dir, job_id))}
    except LeaseLost:
        log.warning("job %s: lease lost (another worker took it over); dropping this run", job_id)
        state = "lost"
    except JobCancelled:
        state = "cancelled"
    except Exception as exc:  # the job fails; the worker lives on
        log.exception("job %s failed", job_id)
        fields = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        seconds = time.monotonic() - started
        if metrics is not None:
            metrics.job_stopped()
    if state == "lost":
        return state
    if not store.transition(job_id, ["running"], state, token, finished_at=time.time(), **fields):
        log.warning("job %s: lease expired before the result could be recorded; another run will", job_id)
        return "lost"
    if metrics is not None:
        metrics.job_finished(state, seconds)
    return state
