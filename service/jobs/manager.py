"""The API side of the jobs: resolve names, record, queue, read back, cancel."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.settings import ModelSpec, Settings
from ditepose.service.jobs.catalogue import Catalogue, UnknownName
from ditepose.service.jobs.executor import BrokerUnavailable, Executor, make_executor
from ditepose.service.jobs.metrics import JobMetrics
from ditepose.service.jobs.plan import JobPlan, eval_options
from ditepose.service.jobs.records import JobRecord, JobStore, make_store
from ditepose.service.jobs.schemas import EvaluateRequest
from ditepose.service.jobs.shards import merge_id, shard_id
from ditepose.service.jobs.video_schemas import VideoJobOptions

log = logging.getLogger(__name__)
T = TypeVar("T")
SWEEP_EVERY_S = 60.0


class UnknownModel(UnknownName):
    """No served model / checkpoint by that name."""


class InvalidRequest(ValueError):
    """The request is well formed but does not fit the dataset."""


class JobService:
    """One per API app, built on the first job request (see :mod:`ditepose.service.http.deps`).

    ``pool`` gives the serving pool (None until it runs): embedded jobs run on it."""

    def __init__(
        self,
        settings: Settings,
        pool: Callable[[], WorkerPool | None] = lambda: None,
        metrics: JobMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.catalogue = Catalogue.from_settings(settings)
        self.served_models = {spec.name: spec for spec in settings.models}
        self.default_model = settings.default_model_name
        self.metrics = metrics
        self.store: JobStore = make_store(settings.redis_url, Path(settings.jobs_dir) / "records",
                                          settings.redis_timeout_s)
        self.executor: Executor = make_executor(self.store, settings, pool, metrics)
        self._last_sweep = -SWEEP_EVERY_S

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

    def resolve_model(self, req: EvaluateRequest, dataset_format: Literal["coco", "mpii"]) -> tuple[ModelSpec, bool]:
        """(the model's spec, whether it is a served model) for the request."""
        if req.checkpoint is not None:
            try:
                path = self.catalogue.checkpoint(req.checkpoint)
            except UnknownName as exc:
                raise UnknownModel(str(exc)) from exc
            # arch and dataset matter only for a checkpoint without metadata (the authors' files)
            return ModelSpec(name=req.checkpoint, checkpoint=path, dataset=dataset_format), False
        name = req.model or self.default_model
        if name not in self.served_models:
            raise UnknownModel(f"unknown model {name!r} (served: {sorted(self.served_models)})")
        return self.served_models[name], True

    def plan(self, req: EvaluateRequest) -> JobPlan:
        dataset = self.catalogue.dataset(req.dataset)
        model, served = self.resolve_model(req, dataset.spec.format)
        try:
            options = eval_options(req, dataset.name, dataset.spec, self.settings)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        return JobPlan(model, served, dataset.name, dataset.spec, options)

    def submit(self, req: EvaluateRequest) -> JobRecord:
        plan = self.plan(req)
        self._guard(self.store.ping)
        rec = JobRecord(id=JobRecord.new_id(), request=req.model_dump(), plan=plan.to_dict())
        self._guard(lambda: self.store.create(rec))
        try:
            self.executor.submit(rec.id)
        except BrokerUnavailable as exc:
            error = str(exc)
            self._guard(lambda: self.store.transition(rec.id, ["queued"], "failed", finished_at=time.time(),
                                                      error=error))
            raise
        if self.metrics is not None:
            self.metrics.job_submitted(plan.dataset_name)
        return rec

    def submit_video(self, options: VideoJobOptions, upload: Path | None = None, suffix: str = ".mp4",
                     catalogue: str | None = None) -> JobRecord:
        """Plan and queue a video job: an accepted ``upload`` (moved into the job's folder) or a
        ``catalogue`` video. Raises UnknownModel, UnknownName (video), the probe's NotAVideo /
        NoDecodableFrames (the upload is deleted then), BrokerUnavailable."""
        from ditepose.service.jobs.video import catalogue_video, job_folder, move_upload, plan_video_job

        name = options.model or self.default_model
        if name not in self.served_models:
            raise UnknownModel(f"unknown model {name!r} (served: {sorted(self.served_models)})")
        self.sweep_videos()
        job_id = JobRecord.new_id()
        folder = job_folder(self.settings, job_id)
        try:
            if catalogue is not None:
                video = catalogue_video(self.settings, catalogue)
            else:
                assert upload is not None
                video = move_upload(upload, folder, suffix)
            plan = plan_video_job(self.settings, self.served_models[name], video, folder, options)
            self._guard(self.store.ping)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        request = {"video": catalogue or "upload", **options.model_dump(exclude_none=True)}
        rec = JobRecord(id=job_id, request=request, plan=plan.to_dict(), kind="video", shards=len(plan.segments))
        self._guard(lambda: self._create_video_records(rec))
        try:
            self.executor.dispatch_video([shard_id(job_id, i) for i in range(rec.shards)])
        except BrokerUnavailable as exc:
            error = str(exc)
            self._guard(lambda: self.store.transition(job_id, ["queued"], "failed", finished_at=time.time(),
                                                      error=error))
            raise
        return rec

    def _create_video_records(self, rec: JobRecord) -> None:
        """The segments' and the merge's records first, then the job's: a listed job always has them."""
        for i in range(rec.shards):
            self.store.create(JobRecord(id=shard_id(rec.id, i), parent=rec.id, kind="video",
                                        plan={"index": i}, request={"job": rec.id}))
        self.store.create(JobRecord(id=merge_id(rec.id), parent=rec.id, kind="video", request={"job": rec.id}))
        self.store.create(rec)

    def sweep_videos(self, force: bool = False) -> list[str]:
        """Delete expired video uploads and results (:func:`~ditepose.service.jobs.video.sweep_expired`), at
        most once a minute unless ``force``; a failing sweep is logged, never raised."""
        from ditepose.service.jobs.video import sweep_expired

        now = time.monotonic()
        if not force and now - self._last_sweep < SWEEP_EVERY_S:
            return []
        self._last_sweep = now
        try:
            return sweep_expired(self.settings, self.store)
        except Exception as exc:
            log.warning("video sweep failed: %s", exc)
            return []

    def video_result_file(self, rec: JobRecord, fmt: str) -> Path | None:
        """A succeeded video job's result file in ``fmt`` (json, csv, coco, mp4), None if absent."""
        from ditepose.service.jobs.video import RESULT_FILES, VideoPlan

        if rec.kind != "video" or rec.state != "succeeded" or fmt not in RESULT_FILES:
            return None
        path = Path(VideoPlan.from_dict(rec.plan).folder) / RESULT_FILES[fmt]
        return path if path.is_file() else None

    def get(self, job_id: str) -> JobRecord | None:
        """A job (never a shard's own record), with a sharded job's live progress and shard counts."""
        rec = self._guard(lambda: self.store.get(job_id))
        if rec is None or rec.parent is not None:
            return None
        return self._guard(lambda: self.with_status(rec))

    def with_status(self, rec: JobRecord) -> JobRecord:
        """``rec`` with its live progress and shard (or segment) counts; a video job's frames done."""
        from ditepose.service.jobs.shards import status_of
        from ditepose.service.jobs.video_run import video_status

        if rec.kind == "video":
            rec, rec.frames_done = video_status(self.store, rec)
            return rec
        return status_of(self.store, rec)

    def recent(self, limit: int | None = None) -> list[JobRecord]:
        def listed() -> list[JobRecord]:
            recs = self.store.recent(limit or self.settings.recent_jobs)
            return [self.with_status(r) if r.kind == "video" else r for r in recs]

        return self._guard(listed)

    def cancel(self, job_id: str) -> JobRecord | None:
        """Queued jobs are cancelled at once; running ones stop at their next batch, a sharded one's
        shards too (queued shards at once); it is 'cancelled' once none of them runs."""
        from ditepose.service.jobs.shards import cancel_shards, finish_cancel, shard_ids

        rec = self._guard(lambda: self.store.get(job_id))
        if rec is None or rec.parent is not None:
            return None
        state = self._guard(lambda: self.store.request_cancel(job_id))
        if state is None:
            return None
        # read after the flag: a run splitting the job now either wrote its shards already (cancelled
        # here) or sees the flag once it has (and cancels them itself)
        rec = self._guard(lambda: self.store.get(job_id))
        shards = shard_ids(rec) if rec is not None else []
        if shards:
            self._guard(lambda: cancel_shards(self.store, job_id, len(shards)))
            self._guard(lambda: finish_cancel(self.store, job_id))
        if state in ("queued", "running", "cancelled"):
            self.executor.cancel(job_id, shards)
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
