"""Request and response bodies of the evaluation-job routes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ditepose.model.codec import DecoderName
from ditepose.model.detectors import DetectorName
from ditepose.service.jobs.records import JobRecord
from ditepose.training.boxes import BoxSourceName

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
    boxes: BoxSourceName | None = Field(
        default=None, description="Person boxes to crop: 'gt' (annotated), 'detections' (the dataset's detections "
        "file, the paper's protocol; COCO sets with a det_file) or 'detector' (a live person detector run by the job; "
        "the result adds its report). MPII: 'gt' only. Default: 'gt' (or what `use_gt_boxes` says).",
        examples=["detector"])
    detector: DetectorName | None = Field(
        default=None, description="boxes='detector' only: which detector. Default: the service's default detector "
        "(nanodet for 'auto').")
    det_score_thr: float | None = Field(
        default=None, ge=0.0, description="Boxes scoring below this are dropped. Default: 0.0 for 'detections' "
        "(the authors' det_bbox_thr); for 'detector' the service's threshold (DITEPOSE_DET_SCORE_THRESHOLD) for "
        "nanodet, else the detector's own.")
    use_gt_boxes: bool | None = Field(
        default=None, description="Deprecated: use `boxes`. true = 'gt', false = 'detections' "
        "(as before `boxes`: a dataset without a det_file fails the job rather than the request).")
    batch_size: int = Field(default=32, ge=1, le=512, description="Persons per forward pass.")
    max_images: int | None = Field(
        default=None, ge=1, description="COCO only: evaluate the first N images (by id) that hold persons, "
        "scored on those images alone (a quick check; not comparable with full-set numbers)."
    )
    shard_size: int | None = Field(
        default=None, ge=1, description="Images per shard: a job over more images is split into shards that "
        "run on any free worker and are scored together once (the numbers do not depend on it). Default and "
        "upper bound: the server's DITEPOSE_SHARD_SIZE; at most DITEPOSE_MAX_SHARDS shards. boxes 'detector' "
        "jobs are not split (the detector's pass covers the whole set).")

    @model_validator(mode="after")
    def _one_model(self) -> EvaluateRequest:
        if self.model is not None and self.checkpoint is not None:
            raise ValueError("give either `model` or `checkpoint`, not both")
        if self.boxes is not None and self.use_gt_boxes is not None and \
                (self.boxes == "gt") != self.use_gt_boxes:
            raise ValueError(f"`boxes` {self.boxes!r} contradicts `use_gt_boxes` {self.use_gt_boxes}; give `boxes` "
                             "alone")
        if self.detector is not None and self.box_source != "detector":
            raise ValueError(f"`detector` is for boxes 'detector', not {self.box_source!r}")
        if self.det_score_thr is not None and self.box_source == "gt":
            raise ValueError("`det_score_thr` is for boxes 'detections' or 'detector', not 'gt'")
        return self

    @property
    def box_source(self) -> str:
        """``boxes``, or what the deprecated ``use_gt_boxes`` means."""
        if self.boxes is not None:
            return self.boxes
        return "detections" if self.use_gt_boxes is False else "gt"


class JobTimings(BaseModel):
    queued_s: float | None = Field(description="Submission to start of the (last) run.")
    run_s: float | None = Field(description="Start of the (last) run to its end, or until now.")
    load_s: float | None = Field(default=None, description="Model and dataset loading (with boxes='detector': "
                                 "the detector's pass over the images too).")
    inference_s: float | None = Field(default=None, description="Crops, forward passes and decoding.")
    metric_s: float | None = Field(default=None, description="Writing predictions and computing the metrics.")


class JobResponse(BaseModel):
    id: str
    kind: Literal["evaluation", "video"] = Field(default="evaluation", description="What the job does: "
                                                 "POST /v1/evaluate or POST /v1/videos.")
    state: JobState
    progress: float = Field(description="Percent of the persons processed (a sharded job: the shards done out "
                            "of the total, plus the persons done within the running ones); a video job: frames "
                            "done out of the total.")
    shards: dict | None = Field(default=None, description="A sharded job: {\"total\", \"succeeded\", "
                                "\"running\", \"queued\", \"cancelled\", \"failed\", \"attempts\"} of its "
                                "shards (runs started, more than total when a worker died mid-shard).")
    created_at: str
    started_at: str | None
    finished_at: str | None
    timings: JobTimings
    request: dict
    metrics: dict[str, float] | None = Field(description="COCO: AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, "
                                             "ARl. MPII: PCKh@0.5 per joint group and mean (PCKh), PCKh@0.1.")
    num_images: int | None = None
    num_persons: int | None = Field(default=None, description="Person boxes evaluated (with detected boxes: the "
                                    "detections kept).")
    boxes: str | None = Field(default=None, description="The boxes' one-string label: 'gt', 'detections:<file>' "
                              "or 'detector:<name>'.")
    box_source: dict | None = Field(default=None, description='The boxes used: {"source": "gt"}, {"source": '
                                    '"detections", "file", "det_bbox_thr"} or {"source": "detector", "detector", '
                                    '"score_thr"}.')
    detector_report: dict | None = Field(default=None, description="boxes='detector': the detector's recall at IoU "
                                         "0.5 of people with >= 5 labelled joints, false positives per image, "
                                         "person box AP/AP50 and ms per image on the scored images.")
    demo_weights: bool | None = Field(default=None, description="True: the model had no checkpoint (random).")
    predictions_url: str | None = Field(description="Per-image predictions JSON, once the job succeeded.")
    frames_done: int | None = Field(default=None, description="A video job: frames processed so far.")
    frames_total: int | None = Field(default=None, description="A video job: frames in the video.")
    result_url: str | None = Field(default=None, description="A video job that succeeded: its tracks "
                                   "(GET ...?format=json|csv|coco|mp4).")
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
    stage = {k: v for k, v in result.get("timings", {}).items() if k in JobTimings.model_fields}
    video = rec.kind == "video"
    return JobResponse(
        id=rec.id,
        kind="video" if video else "evaluation",
        state=rec.state,  # type: ignore[arg-type]
        progress=round(float(rec.progress), 2),
        shards=rec.shard_status,
        created_at=_iso(rec.created_at) or "",
        started_at=_iso(rec.started_at),
        finished_at=_iso(rec.finished_at),
        timings=JobTimings(queued_s=max(queued, 0.0), run_s=run, **stage),
        request=rec.request,
        metrics=result.get("metrics"),
        num_images=result.get("num_images"),
        num_persons=result.get("num_persons"),
        boxes=result.get("boxes"),
        box_source=result.get("box_source"),
        detector_report=result.get("detector_report"),
        demo_weights=result.get("demo_weights"),
        predictions_url=f"/v1/jobs/{rec.id}/predictions" if rec.state == "succeeded" and rec.predictions else None,
        frames_done=rec.frames_done if video else None,
        frames_total=int(rec.plan["info"]["frames"]) if video else None,
        result_url=f"/v1/jobs/{rec.id}/result" if video and rec.state == "succeeded" else None,
        error=rec.error,
        attempts=rec.attempts,
        cancel_requested=rec.cancel_requested,
        worker=rec.worker,
    )
