"""Celery app of the evaluation jobs: Redis broker and result backend from :class:`Settings`.

Each worker process runs its jobs on a worker pool of its own (built after the prefork fork,
on the configured ``devices``), through the same code as the API's embedded jobs.

Delivery is at-least-once (``acks_late`` + ``task_reject_on_worker_lost``; a task whose worker
vanished comes back after the broker's ``visibility_timeout``); :func:`run_job`'s lease and
compare-and-set make the *result* exactly-once. A redelivered copy that finds the job leased
by a live worker re-queues itself (``retry``) instead of being dropped, so the job still
finishes if that worker dies later. A run that loses Redis mid-job (a Redis restart) waits for
it to return and re-queues the job instead of failing, which would ack the message and strand
the record in 'running'.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from ditepose.service.core.settings import Settings

log = logging.getLogger(__name__)

TASK_NAME = "ditepose.evaluate"
SHARD_TASK_NAME = "ditepose.evaluate_shard"
VIDEO_TASK_NAME = "ditepose.video_segment"


def celery_config(settings: Settings) -> dict[str, Any]:
    timeout = settings.redis_timeout_s
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_timeout": max(timeout, 5.0),  # a worker's blocking read must not time out on an idle queue
        "socket_connect_timeout": timeout,
        # How often a worker sweeps for unacknowledged tasks older than visibility_timeout (kombu's
        # default, 10 s x 10, would hide a low visibility_timeout).
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 2)),
        "unacked_restore_throttle": 1,
    }
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.soft_time_limit_s,
        "task_time_limit": settings.hard_time_limit_s,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "redis_socket_timeout": timeout,
        "redis_socket_connect_timeout": timeout,
        "broker_connection_timeout": timeout,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.job_queue,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_track_started": True,
        "result_expires": 7 * 24 * 3600,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


class _WorkerContext:
    """Per-process store, metrics and worker pool of a Celery worker (built lazily: after the prefork fork)."""

    def __init__(self, settings: Settings) -> None:
        from ditepose.service.batching.pool import WorkerPool
        from ditepose.service.jobs.metrics import JobMetrics
        from ditepose.service.jobs.records import RedisJobStore

        assert settings.redis_url is not None
        self.store = RedisJobStore(settings.redis_url, timeout_s=settings.redis_timeout_s)
        self.metrics = JobMetrics()
        # No served models: each job adds its model for its run (model_in_pool). One inference
        # worker per device; torch_threads as configured (None: torch's default).
        self.pool = WorkerPool(
            [], settings.resolved_devices(), max_batch_size=settings.max_batch_size,
            max_delay_ms=settings.max_delay_ms, timeout_s=settings.soft_time_limit_s, workers_per_device=1,
            precision=settings.precision, torch_threads=settings.torch_threads,
        ).start()


def make_celery(settings: Settings) -> Celery:
    """The app the API publishes with and ``ditepose worker`` consumes with."""
    if not settings.redis_url:
        raise ValueError("the Celery job queue needs DITEPOSE_REDIS_URL (without it jobs run embedded)")
    app = Celery("ditepose", broker=settings.redis_url, backend=settings.redis_url, set_as_current=False)
    app.conf.update(celery_config(settings))
    contexts: dict[str, _WorkerContext] = {}

    def context() -> _WorkerContext:
        if "ctx" not in contexts:
            contexts["ctx"] = _WorkerContext(settings)
        return contexts["ctx"]

    def dispatch_shards(shard_ids: list[str]) -> None:
        """A split job's shards, one task each (task id = shard id, so a cancel can revoke them)."""
        for shard_id in shard_ids:
            app.send_task(SHARD_TASK_NAME, args=[shard_id], task_id=shard_id, queue=settings.job_queue)

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def evaluate(self: Any, job_id: str) -> str:
        from ditepose.service.jobs.evaluation import run_job

        ctx = context()
        return _deliver(self, settings, job_id, lambda: run_job(
            job_id, ctx.store, ctx.pool, settings.jobs_dir, lease_ttl_s=settings.lock_ttl_s,
            soft_time_limit_s=settings.soft_time_limit_s, metrics=ctx.metrics, dispatch=dispatch_shards,
        ))

    @app.task(name=SHARD_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def evaluate_shard(self: Any, shard_id: str) -> str:
        from ditepose.service.jobs.shards import run_shard

        ctx = context()
        return _deliver(self, settings, shard_id, lambda: run_shard(
            shard_id, ctx.store, ctx.pool, settings.jobs_dir, lease_ttl_s=settings.lock_ttl_s,
            soft_time_limit_s=settings.soft_time_limit_s,
        ))

    @app.task(name=VIDEO_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def video_segment(self: Any, segment_id: str) -> str:
        from ditepose.service.jobs.video_run import run_video_segment

        ctx = context()
        return _deliver(self, settings, segment_id, lambda: run_video_segment(
            segment_id, ctx.store, ctx.pool, lease_ttl_s=settings.lock_ttl_s,
            soft_time_limit_s=settings.soft_time_limit_s,
        ))

    app.evaluate_task = evaluate
    app.video_segment_task = video_segment
    app.evaluate_shard_task = evaluate_shard
    if settings.torch_threads:
        _set_torch_threads_in_children(settings.torch_threads)
    return app


def _deliver(self: Any, settings: Settings, job_id: str, body: Callable[[], str]) -> str:
    """A job's or a shard's run, with the same answers to a lost Redis and to a busy lease."""
    import redis

    try:
        outcome = body()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        # Redis went away mid-job (e.g. a restart). Failing here would ack the message and leave
        # the record 'running' forever: wait for Redis, then queue a fresh copy of the task.
        log.warning("job %s: Redis unreachable (%s); re-queueing the job once it is back", job_id, exc)
        _wait_for_redis(settings.redis_url or "", settings.visibility_timeout_s * 4 + 30)
        raise self.retry(countdown=min(settings.lock_ttl_s, 5), max_retries=None) from exc
    if outcome == "busy":  # a live worker holds it; look again once its lease could have run out
        # (sooner than visibility_timeout, so this waiting copy is not itself redelivered)
        countdown = min(settings.lock_ttl_s, settings.visibility_timeout_s / 2)
        raise self.retry(countdown=countdown, max_retries=None)
    return outcome


def _wait_for_redis(url: str, timeout_s: float) -> bool:
    """Poll Redis until it answers a PING (True) or ``timeout_s`` passes (False)."""
    import time

    import redis

    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return True
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass
            time.sleep(0.5)
        return False
    finally:
        client.close()


def limit_threads(threads: int) -> None:
    """This process's torch and OpenCV thread pools, both to ``threads``: a job worker's share of
    the cores covers its image decoding and crops too (OpenCV's pool defaults to every core, so a
    one-thread worker would otherwise spread its warps over all of them)."""
    import cv2
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)


def _set_torch_threads_in_children(threads: int) -> None:
    def _init(**_: Any) -> None:
        limit_threads(threads)

    worker_process_init.connect(_init, weak=False)
