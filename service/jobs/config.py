"""Settings of the evaluation jobs (``DITEPOSE_*`` variables, like the service's own settings).

They live apart from :class:`service.settings.Settings` so the worker process needs nothing
of the HTTP service; the API builds them with :meth:`JobSettings.for_service`, which takes
``redis_url`` from the service settings and everything else from the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class DatasetSpec(BaseModel):
    """One evaluation set on the server's disk; clients only ever name it."""

    format: Literal["coco", "mpii"] = Field(description="'coco' (person keypoints json) or 'mpii' (mmpose json).")
    ann_file: Path = Field(description="COCO annotation json, or mmpose's MPII annotation json.")
    img_dir: Path = Field(description="Folder holding the images the annotations name.")
    det_file: Path | None = Field(
        default=None, description="COCO only: person detections json (needed for use_gt_boxes=false)."
    )
    gt_file: Path | None = Field(default=None, description="MPII only: ground truth (.json/.npz/.mat) for PCKh.")

    @model_validator(mode="after")
    def _check_format(self) -> DatasetSpec:
        if self.format == "mpii" and self.gt_file is None:
            raise ValueError("an MPII dataset needs gt_file (mpii_gt_val.json/.npz/.mat) for PCKh")
        if self.format == "mpii" and self.det_file is not None:
            raise ValueError("det_file is for COCO datasets only")
        return self


class JobSettings(BaseSettings):
    """Broker, catalogue and limits of the evaluation jobs; see each field's description."""

    model_config = SettingsConfigDict(env_prefix="DITEPOSE_", env_file=".env", extra="ignore")

    redis_url: str | None = Field(
        default=None, description="Redis for broker, results and job records; None = embedded mode (threads)."
    )
    datasets: dict[str, DatasetSpec] = Field(
        default_factory=dict,
        description='Evaluation sets by name, as JSON: {"coco-val": {"format": "coco", "ann_file": ..., '
        '"img_dir": ...}}.',
    )
    datasets_file: Path | None = Field(default=None, description="JSON file with more datasets in the same shape.")
    demo_dataset: bool = Field(
        default=True,
        description="Offer the built-in 'demo-synthetic' COCO-format set (8 synthetic images, made under "
        "jobs_dir on first use), so /v1/evaluate works out of the box.",
    )
    checkpoint_dir: Path | None = Field(
        default=None, description="Folder whose checkpoint files (.pth/.pt) jobs may name by file name."
    )
    jobs_dir: Path = Field(
        default=Path("var/jobs"), description="Where predictions files (and embedded-mode records) are written."
    )
    job_queue: str = Field(default="ditepose-eval", description="Celery queue of the evaluation tasks.")
    embedded_workers: int = Field(default=1, ge=1, le=8, description="Evaluation threads in embedded mode.")
    soft_time_limit_s: float = Field(default=3600.0, gt=0, description="A job running longer fails (checked per batch).")
    hard_time_limit_s: float = Field(
        default=3900.0, gt=0, description="Celery kills a task running longer (prefork pool only)."
    )
    visibility_timeout_s: int = Field(
        default=4000, ge=1,
        description="Redis broker: an unacknowledged task (its worker died) is redelivered after this long. "
        "Keep it above hard_time_limit_s: a task still running past it is delivered again (the job's lease "
        "keeps that copy waiting, but it costs a retry loop).",
    )
    lock_ttl_s: float = Field(
        default=30.0, gt=0,
        description="A running job's lease; renewed every batch. A job whose lease ran out may be taken over.",
    )
    redis_timeout_s: float = Field(default=2.0, gt=0, description="Socket timeout towards Redis.")
    recent_jobs: int = Field(default=50, ge=1, le=1000, description="Jobs GET /v1/jobs lists (newest first).")
    torch_threads: int | None = Field(default=None, ge=1, description="torch threads in a worker (None = default).")
    device: str = Field(default="auto", description="Where jobs run the network: 'auto' (cuda:0 if present), 'cpu', "
                        "'cuda:N'. Evaluation always runs in fp32.")

    @model_validator(mode="after")
    def _check_limits(self) -> JobSettings:
        if self.hard_time_limit_s <= self.soft_time_limit_s:
            raise ValueError("hard_time_limit_s must exceed soft_time_limit_s")
        return self

    @classmethod
    def for_service(cls, settings: Any, **overrides: Any) -> JobSettings:
        """Job settings beside a running service: its ``redis_url`` (and torch threads) win."""
        values: dict[str, Any] = {"redis_url": getattr(settings, "redis_url", None)}
        if getattr(settings, "torch_threads", None) is not None:
            values["torch_threads"] = settings.torch_threads
        values.update(overrides)
        return cls(**values)
