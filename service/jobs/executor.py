"""Where jobs run: Celery workers (Redis configured) or threads of the API process (embedded).

Both call the same :func:`~ditepose.service.jobs.evaluation.run_job`, so a job behaves the
same in either mode; only delivery and the pool differ. Embedded jobs run on the serving
pool (their crops batched with, and yielding to, live requests); a Celery worker process has
a pool of its own (:mod:`ditepose.service.jobs.celery_app`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.settings import Settings
from ditepose.service.jobs.evaluation import run_job
from ditepose.service.jobs.records import JobStore

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """The queue cannot take the job now (Redis down)."""


class Executor(Protocol):
    mode: str

    def submit(self, job_id: str) -> None: ...

    def dispatch_video(self, segment_ids: list[str]) -> None: ...

    def cancel(self, job_id: str, shards: list[str] | None = None) -> None: ...

    def close(self) -> None: ...


class ThreadExecutor:
    """Embedded mode: the task body on a small thread pool inside the API process."""

    mode = "embedded"

    def __init__(
        self, store: JobStore, settings: Settings, pool: Callable[[], WorkerPool | None], metrics: Any = None
    ) -> None:
        self.store, self.settings, self.metrics = store, settings, metrics
        self.pool = pool  # the serving pool, once started
        self._pool = ThreadPoolExecutor(max_workers=settings.embedded_workers, thread_name_prefix="ditepose-job")
        self.futures: dict[str, Future[str]] = {}

    def _run(self, job_id: str) -> str:
        pool = self.pool()
        if pool is None:
            raise RuntimeError("the serving pool is not running")
        try:
            return run_job(
                job_id, self.store, pool, self.settings.jobs_dir, lease_ttl_s=self.settings.lock_ttl_s,
                soft_time_limit_s=self.settings.soft_time_limit_s, metrics=self.metrics,
                dispatch=self._dispatch_shards,
            )
        except Exception:
            log.exception("embedded job %s crashed", job_id)
            raise

    def _run_shard(self, shard_id: str) -> str:
        from ditepose.service.jobs.shards import run_shard

        pool = self.pool()
        if pool is None:
            raise RuntimeError("the serving pool is not running")
        try:
            return run_shard(shard_id, self.store, pool, self.settings.jobs_dir, lease_ttl_s=self.settings.lock_ttl_s,
                             soft_time_limit_s=self.settings.soft_time_limit_s)
        except Exception:
            log.exception("embedded shard %s crashed", shard_id)
            raise

    def _dispatch_shards(self, shard_ids: list[str]) -> None:
        """A split job's shards, on the same threads (``embedded_workers`` of them run at once)."""
        for shard_id in shard_ids:
            self.futures[shard_id] = self._pool.submit(self._run_shard, shard_id)

    def submit(self, job_id: str) -> None:
        self.futures[job_id] = self._pool.submit(self._run, job_id)

    def _run_video_segment(self, segment_id: str) -> str:
        from ditepose.service.jobs.video_run import run_video_segment

        pool = self.pool()
        if pool is None:
            raise RuntimeError("the serving pool is not running")
        try:
            return run_video_segment(segment_id, self.store, pool, lease_ttl_s=self.settings.lock_ttl_s,
                                     soft_time_limit_s=self.settings.soft_time_limit_s)
        except Exception:
            log.exception("embedded video segment %s crashed", segment_id)
            raise

    def dispatch_video(self, segment_ids: list[str]) -> None:
        """A video job's segments, on the job threads (``embedded_workers`` of them run at once)."""
        for segment_id in segment_ids:
            self.futures[segment_id] = self._pool.submit(self._run_video_segment, segment_id)

    def cancel(self, job_id: str, shards: list[str] | None = None) -> None:
        """The store's flags do it: a queued job or shard is skipped, a running one stops at its next batch."""

    def close(self) -> None:
        """Shutting down: unfinished jobs are cancelled (a running one stops at its next batch)."""
        for job_id, future in list(self.futures.items()):
            if not future.done():
                try:
                    self.store.request_cancel(job_id)
                except Exception as exc:
                    log.warning("could not cancel job %s at shutdown: %s", job_id, exc)
        self._pool.shutdown(wait=False, cancel_futures=True)


class CeleryExecutor:
    """Redis mode: publish to the Celery queue; ``ditepose worker`` processes consume it."""

    mode = "celery"

    def __init__(self, settings: Settings) -> None:
        from ditepose.service.jobs.celery_app import make_celery

        self.settings = settings
        self.app = make_celery(settings)

    def submit(self, job_id: str) -> None:
        from ditepose.service.jobs.celery_app import TASK_NAME

        try:
            self.app.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=self.settings.job_queue, retry=False)
        except Exception as exc:  # kombu/redis connection errors
            raise BrokerUnavailable(f"could not queue the job: {type(exc).__name__}: {exc}") from exc

    def dispatch_video(self, segment_ids: list[str]) -> None:
        """One task per segment (task id = segment id, so a cancel can revoke them)."""
        from ditepose.service.jobs.celery_app import VIDEO_TASK_NAME

        try:
            for segment_id in segment_ids:
                self.app.send_task(VIDEO_TASK_NAME, args=[segment_id], task_id=segment_id,
                                   queue=self.settings.job_queue, retry=False)
        except Exception as exc:  # kombu/redis connection errors
            raise BrokerUnavailable(f"could not queue the video job: {type(exc).__name__}: {exc}") from exc

    def cancel(self, job_id: str, shards: list[str] | None = None) -> None:
        """Revoke so workers drop the messages; a running task stops via the store's cancel flag."""
        try:
            self.app.control.revoke([job_id, *(shards or [])])
        except Exception as exc:
            log.warning("revoke of job %s failed (the cancel flag still stops it): %s", job_id, exc)

    def close(self) -> None:
        self.app.close()


def make_executor(
    store: JobStore, settings: Settings, pool: Callable[[], WorkerPool | None], metrics: Any = None
) -> Executor:
    """Celery when ``redis_url`` is set, else threads on the serving ``pool``."""
    if settings.redis_url:
        return CeleryExecutor(settings)
    return ThreadExecutor(store, settings, pool, metrics)
