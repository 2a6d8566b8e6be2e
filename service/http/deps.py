"""Typed FastAPI dependencies: how a route reaches the parts of the service.

:func:`~ditepose.service.http.app.create_app` puts one :class:`AppContext` on the app; routes
never read ``app.state`` but declare what they need as typed parameters (``service:
PoseServiceDep``), as the full-stack FastAPI template does. A dependency that is not there yet
answers for itself: the pose service is ``unavailable`` while the models load, the jobs service
is built on first use.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.admission import Admission
from ditepose.service.core.errors import ServiceError
from ditepose.service.core.metrics import ServiceMetrics
from ditepose.service.core.pose_service import PoseService
from ditepose.service.core.settings import Settings
from ditepose.service.jobs.manager import JobService


@dataclass
class AppContext:
    """What one REST app holds: settings, metrics, the admission count, the pool and services."""

    settings: Settings
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    admission: Admission | None = None
    pool: WorkerPool | None = None
    service: PoseService | None = None
    _jobs: JobService | None = field(default=None, repr=False)
    _jobs_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        # One in-flight count for POST /v1/pose, gRPC Estimate and gRPC stream frames.
        if self.admission is None:
            self.admission = Admission(self.settings.resolved_max_in_flight, self.settings.retry_after_s)
        self.metrics.watch_admission(self.admission)
        self.api_key = self.settings.resolved_api_key()

    def attach(self, pool: WorkerPool) -> None:
        """Serve from ``pool`` (started by the app's lifespan or handed in by the caller)."""
        assert self.admission is not None
        self.pool = pool
        self.service = PoseService(pool, self.settings, self.admission)
        pool.add_observer(self.metrics)
        self.metrics.watch_pool(pool)

    def jobs(self) -> JobService:
        """The evaluation-job service, built on first use (embedded jobs run on :attr:`pool`)."""
        if self._jobs is None:
            with self._jobs_lock:
                if self._jobs is None:
                    from ditepose.service.jobs.metrics import JobMetrics, JobStoreCollector

                    metrics = JobMetrics(self.metrics.registry)
                    jobs = JobService(self.settings, lambda: self.pool, metrics)
                    metrics.registry.register(JobStoreCollector(jobs.store))
                    self._jobs = jobs
        return self._jobs

    def close(self) -> None:
        if self._jobs is not None:
            self._jobs.close()


def context_of(app: FastAPI) -> AppContext:
    """The app's context (for the composition root and tests; routes take dependencies)."""
    return app.state.context


def get_context(request: Request) -> AppContext:
    return context_of(request.app)


ContextDep = Annotated[AppContext, Depends(get_context)]


def get_settings(context: ContextDep) -> Settings:
    return context.settings


def get_pose_service(context: ContextDep) -> PoseService:
    """``unavailable`` while the models are still loading."""
    if context.service is None:
        raise ServiceError("unavailable", "the service is starting; models are not loaded yet")
    return context.service


def get_job_service(context: ContextDep) -> JobService:
    return context.jobs()


SettingsDep = Annotated[Settings, Depends(get_settings)]
PoseServiceDep = Annotated[PoseService, Depends(get_pose_service)]
JobServiceDep = Annotated[JobService, Depends(get_job_service)]
