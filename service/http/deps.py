"""Typed FastAPI dependencies: how a route reaches the parts of the service.

:func:`~ditepose.service.http.app.create_app` puts one :class:`AppContext` on the app; routes
never read ``app.state`` but declare what they need as typed parameters (``service:
PoseServiceDep``), as the full-stack FastAPI template does. A dependency that is not there yet
answers for itself: the pose service is ``unavailable`` while the models load, the jobs service
is built on first use.
"""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from ditepose.service.batching.interface import InferencePool
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.admission import Admission
from ditepose.service.core.errors import ServiceError
from ditepose.service.core.metrics import ServiceMetrics
from ditepose.service.core.pose_service import PoseService
from ditepose.service.core.serving import Serving
from ditepose.service.core.settings import Settings
from ditepose.service.jobs.manager import JobService


class AppContext:
    """What one REST app holds: the shared objects of its process (:class:`~ditepose.service.core.serving.Serving`,
    built by the composition root or, for an app that owns its pool, by :func:`~ditepose.service.http.app.create_app`)
    and the job service, built on first use.

    ``jobs_unavailable``: why this process runs no embedded jobs (a front-end of ``--api-processes``
    without Redis), answered as ``unavailable`` by the job routes."""

    def __init__(self, serving: Serving, jobs_unavailable: str | None = None) -> None:
        self.serving = serving
        self.api_key = serving.settings.resolved_api_key()
        self.jobs_unavailable = jobs_unavailable
        self._jobs: JobService | None = None
        self._jobs_lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        return self.serving.settings

    @property
    def metrics(self) -> ServiceMetrics:
        return self.serving.metrics

    @property
    def admission(self) -> Admission:
        return self.serving.admission

    @property
    def service(self) -> PoseService | None:
        """The pose service; None while an app that owns its pool is still loading it."""
        return self.serving.service

    @property
    def pool(self) -> InferencePool | None:
        return self.serving.service.pool if self.serving.service is not None else None

    def _job_pool(self) -> WorkerPool | None:
        """The pool embedded jobs run on: only a pool in this process (a front-end's remote pool
        cannot load a job's model; its jobs are refused by ``jobs_unavailable`` or go to Celery)."""
        pool = self.pool
        return pool if isinstance(pool, WorkerPool) else None

    def jobs(self) -> JobService:
        """The evaluation-job service, built on first use (embedded jobs run on :attr:`pool`)."""
        if self.jobs_unavailable is not None:
            raise ServiceError("unavailable", self.jobs_unavailable)
        if self._jobs is None:
            with self._jobs_lock:
                if self._jobs is None:
                    from ditepose.service.jobs.metrics import JobMetrics, JobStoreCollector

                    metrics = JobMetrics(self.metrics.registry)
                    jobs = JobService(self.settings, self._job_pool, metrics)
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
