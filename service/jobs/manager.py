"""The API side of the jobs: resolve names, record, queue, read back, cancel."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ditepose.service.jobs.catalogue import Catalogue, UnknownName
from ditepose.service.jobs.config import JobSettings
from ditepose.service.jobs.executor import BrokerUnavailable, Executor, make_executor
from ditepose.service.jobs.metrics import JobMetrics
from ditepose.service.jobs.records import JobRecord, JobStore, make_store
from ditepose.service.jobs.schemas import EvaluateRequest

log = logging.getLogger(__name__)
T = TypeVar("T")

# Input size used for a checkpoint without our metadata (the authors' mmpose files), per layout.


class UnknownModel(UnknownName):
    """No served model / checkpoint by that name."""


class InvalidRequest(ValueError):
    """The request is well formed but does not fit the dataset."""


class JobService:
    """One per API app; built lazily on the first job request (see ``service.routes.jobs``)."""

    def __init__(
        self,
        settings: JobSettings,
        served_models: dict[str, dict[str, Any]] | None = None,
        default_model: str | None = None,
        metrics: JobMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.catalogue = Catalogue.from_settings(settings)
        self.served_models = dict(served_models or {})
        self.default_model = default_model
        self.metrics = metrics
        self.store: JobStore = make_store(settings.redis_url, Path(settings.jobs_dir) / "records",
                                          settings.redis_timeout_s)
        self.executor: Executor = make_executor(self.store, settings, metrics)

    @property
    def mode(self) -> str:
        return self.executor.mode

    def _guard(self, fn: Callable[[], T]) -> T:
        """Store calls: a Redis that does not answer becomes :class:`BrokerUnavailable` (HTTP 503)."""
        try:
            return fn()
        except BrokerUnavailable:
            raise
        except Exception as exc:
            import redis

            if isinstance(exc, redis.exceptions.RedisError):
                raise BrokerUnavailable(f"job store unavailable (Redis): {type(exc).__name__}: {exc}") from exc
            raise

    def health(self) -> dict[str, Any]:
        """For /readyz: can jobs be accepted now?"""
        out: dict[str, Any] = {"mode": self.mode, "ready": True}
        if self.settings.redis_url:
            try:
                self._guard(self.store.ping)
            except BrokerUnavailable as exc:
                out.update(ready=False, error=str(exc))
        return out

    def resolve_model(self, req: EvaluateRequest, dataset_format: str) -> dict[str, Any]:
        if req.checkpoint is not None:
            try:
                path = self.catalogue.checkpoint(req.checkpoint)
            except UnknownName as exc:
                raise UnknownModel(str(exc)) from exc
            return {"name": req.checkpoint, "source": "checkpoint", "checkpoint": str(path),
                    "arch": "dite_hrnet_18", "dataset": dataset_format,
                    "input_size": None}  # from the checkpoint's metadata (or the dataset's default)
        name = req.model or self.default_model
        if name is None:
            raise UnknownModel("name a `model` (served) or a `checkpoint`; this server has no default model")
        if name not in self.served_models:
            raise UnknownModel(f"unknown model {name!r} (served: {sorted(self.served_models)})")
        return {"name": name, "source": "served", **self.served_models[name]}

    def submit(self, req: EvaluateRequest) -> JobRecord:
        dataset = self.catalogue.dataset(req.dataset)
        model_ref = self.resolve_model(req, dataset.spec.format)
        self._guard(self.store.ping)
        if req.max_images is not None and dataset.spec.format != "coco":
            raise InvalidRequest("max_images applies to COCO datasets only (MPII PCKh needs every person)")
        options = {"flip_test": req.flip_test, "decoder": req.decoder, "use_gt_boxes": req.use_gt_boxes,
                   "batch_size": req.batch_size, "max_images": req.max_images}
        rec = JobRecord(
            id=JobRecord.new_id(),
            request=req.model_dump(),
            plan={"model": model_ref, "dataset": dataset.to_payload(), "options": options},
        )
        self._guard(lambda: self.store.create(rec))
        try:
            self.executor.submit(rec.id)
        except BrokerUnavailable as exc:
            error = str(exc)
            self._guard(lambda: self.store.transition(rec.id, ["queued"], "failed", finished_at=time.time(),
                                                      error=error))
            raise
        if self.metrics is not None:
            self.metrics.job_submitted(dataset.name)
        return rec

    def get(self, job_id: str) -> JobRecord | None:
        return self._guard(lambda: self.store.get(job_id))

    def recent(self, limit: int | None = None) -> list[JobRecord]:
        return self._guard(lambda: self.store.recent(limit or self.settings.recent_jobs))

    def cancel(self, job_id: str) -> JobRecord | None:
        """Queued jobs are cancelled at once; running ones stop at their next batch."""
        state = self._guard(lambda: self.store.request_cancel(job_id))
        if state is None:
            return None
        if state in ("queued", "running", "cancelled"):
            self.executor.cancel(job_id)
        return self.get(job_id)

    def predictions_file(self, rec: JobRecord) -> Path | None:
        if rec.state != "succeeded" or not rec.predictions:
            return None
        path = Path(rec.predictions)
        return path if path.is_file() else None

    def close(self) -> None:
        try:
            self.executor.close()
        finally:
            self.store.close()


def served_model_refs(settings: Any) -> dict[str, dict[str, Any]]:
    """Served models as the worker needs them, from the service's ``settings.models`` (ModelSpec list)."""
    refs: dict[str, dict[str, Any]] = {}
    for spec in getattr(settings, "models", None) or []:
        refs[spec.name] = {
            "checkpoint": str(spec.checkpoint) if spec.checkpoint is not None else None,
            "arch": spec.arch,
            "dataset": spec.dataset,
            "input_size": list(spec.input_size) if spec.input_size else None,  # None: checkpoint/dataset default
        }
    return refs
