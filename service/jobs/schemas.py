"""Request and response bodies of the evaluation-job routes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ditepose.model.codec import DecoderName
from ditepose.service.jobs.records import JobRecord

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class EvaluateRequest(BaseModel):
    """What to evaluate on what; everything is named, nothing is a path."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    dataset: str = Field(description="Evaluation set name from the server's catalogue (GET /v1/jobs lists none; "
                         "ask the operator).", examples=["coco-val"])
    model: str | None = Field(default=None, description="Served model name (GET /v1/models). Default: the "
                              "service's default model, unless `checkpoint` is given.")
    checkpoint: str | None = Field(default=None, description="File name of a checkpoint in the server's "
                                   "checkpoint folder, instead of a served model.", examples=["hrnet18_e10.pth"])
    flip_test: bool = Field(default=True, description="Average with the mirrored crop (the paper's protocol).")
    decoder: DecoderName = Field(
        default="default", description="Heatmap decoding, as in POST /v1/pose."
    )
    use_gt_boxes: bool = Field(default=True, description="Ground-truth person boxes; false = the dataset's "
                               "detection boxes (COCO sets with a det_file).")
    batch_size: int = Field(default=32, ge=1, le=512, description="Persons per forward pass.")
    max_images: int | None = Field(
        default=None, ge=1, description="COCO only: evaluate the first N images (by id) that hold persons, "
        "scored on those images alone (a quick check; not comparable with full-set numbers)."
    )

    @model_validator(mode="after")
    def _one_model(self) -> EvaluateRequest:
        if self.model is not None and self.checkpoint is not None:
            raise ValueError("give either `model` or `checkpoint`, not both")
        return self


class JobTimings(BaseModel):
    queued_s: float | None = Field(description="Submission to start of the (last) run.")
    run_s: float | None = Field(description="Start of the (last) run to its end, or until now.")
    load_s: float | None = Field(default=None, description="Model and dataset loading.")
    inference_s: float | None = Field(default=None, description="Crops, forward passes and decoding.")
    metric_s: float | None = Field(default=None, description="Writing predictions and computing the metrics.")


class JobResponse(BaseModel):
    id: str
    state: JobState
    progress: float = Field(description="Percent of the persons processed.")
    created_at: str
    started_at: str | None
    finished_at: str | None
    timings: JobTimings
    request: dict
    metrics: dict[str, float] | None = Field(description="COCO: AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, "
                                             "ARl. MPII: PCKh@0.5 per joint group and mean (PCKh), PCKh@0.1.")
    num_images: int | None = None
    num_persons: int | None = None
    demo_weights: bool | None = Field(default=None, description="True: the model had no checkpoint (random).")
    predictions_url: str | None = Field(description="Per-image predictions JSON, once the job succeeded.")
    error: str | None
    attempts: int = Field(description="Runs started (more than 1 when a worker died and another took over).")
    cancel_requested: bool
    worker: str | None


class JobList(BaseModel):
    jobs: list[JobResponse]


class JobAccepted(BaseModel):
    id: str
    state: JobState
    location: str


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


def job_response(rec: JobRecord, now: float) -> JobResponse:
    result = rec.result or {}
    end = rec.finished_at if rec.finished_at is not None else now
    queued = (rec.started_at or end) - rec.created_at
    run = end - rec.started_at if rec.started_at is not None else None
    stage = result.get("timings", {})
    return JobResponse(
        id=rec.id,
        state=rec.state,  # type: ignore[arg-type]
        progress=round(float(rec.progress), 2),
        created_at=_iso(rec.created_at) or "",
        started_at=_iso(rec.started_at),
        finished_at=_iso(rec.finished_at),
        timings=JobTimings(queued_s=max(queued, 0.0), run_s=run, **stage),
        request=rec.request,
        metrics=result.get("metrics"),
        num_images=result.get("num_images"),
        num_persons=result.get("num_persons"),
        demo_weights=result.get("demo_weights"),
        predictions_url=f"/v1/jobs/{rec.id}/predictions" if rec.state == "succeeded" and rec.predictions else None,
        error=rec.error,
        attempts=rec.attempts,
        cancel_requested=rec.cancel_requested,
        worker=rec.worker,
    )
