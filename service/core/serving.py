"""What a composition root builds once and hands to the transports.

``ditepose serve`` (:mod:`ditepose.service.server`), the inference host and its front-ends
(:mod:`ditepose.service.host`), and a REST app that owns its pool
(:func:`ditepose.service.http.app.create_app` without one) all wire the same way:

1. :func:`build_pool`: the settings' models loaded, the worker pool laid out on the devices,
   and the model repository watcher that manages their versions (:class:`ServingPool`);
2. :meth:`Serving.create`: the metrics registry and the one in-flight count (:class:`Admission`);
3. :meth:`Serving.attach`: the pose service over the pool, which REST and gRPC share.
"""

from __future__ import annotations

from dataclasses import dataclass

from ditepose.service.batching.interface import InferencePool
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.batching.worker import BatchObserver, heap_trimmer
from ditepose.service.core.admission import Admission
from ditepose.service.core.metrics import ServiceMetrics
from ditepose.service.core.model_loader import load_models_isolated
from ditepose.service.core.pose_service import PoseService
from ditepose.service.core.repository_watcher import ModelRepositoryWatcher
from ditepose.service.core.settings import Settings


@dataclass
class ServingPool:
    """A worker pool and the watcher that swaps its model versions; started and stopped together."""

    pool: WorkerPool
    watcher: ModelRepositoryWatcher | None = None  # None: a pool built by hand (benches), no versions managed

    def start(self) -> ServingPool:
        """Start the workers, then the repository poller (it swaps into running workers)."""
        self.pool.start()
        if self.watcher is not None:
            self.watcher.start()
        return self

    def stop(self) -> None:
        """Stop polling first (no swap may start on a stopping pool), then the workers."""
        if self.watcher is not None:
            self.watcher.stop()
        self.pool.stop()


def build_pool(settings: Settings, observer: BatchObserver | None = None) -> ServingPool:
    """Load the configured models (``--model`` flags and the model repository), lay out workers on
    the configured devices and attach the repository watcher; nothing is started yet."""
    heap_trimmer.enabled = settings.trim_memory_when_idle  # process-wide, like the heap it trims
    watcher = ModelRepositoryWatcher(settings)
    specs = watcher.flag_specs()
    loaded, failed = load_models_isolated(specs, allow_none=watcher.repository is not None)
    loaded += watcher.initial_models({m.name for m in loaded} | set(failed))
    if not loaded:
        raise RuntimeError("no model could be loaded: " + ("; ".join(f"{n}: {r}" for n, r in failed.items())
                                                              or f"the repository {watcher.repository} is empty"))
    pool = WorkerPool(
        loaded,
        settings.resolved_devices(),
        max_batch_size=settings.max_batch_size,
        max_delay_ms=settings.max_delay_ms,
        queue_size=settings.queue_size,
        timeout_s=settings.request_timeout_s,
        workers_per_device=settings.resolved_workers_per_device(),
        precision=settings.precision,
        engine=settings.engine,
        observer=observer,
        torch_threads=settings.resolved_torch_threads(),
        worker_processes=settings.worker_processes,
        cuda_graphs=settings.cuda_graphs,
        default_model=settings.default_model or (specs[0].name if specs else loaded[0].name),
        failed_models=failed,
    )
    watcher.attach(pool)
    return ServingPool(pool, watcher)


@dataclass
class Serving:
    """The shared objects of one serving process: settings, metrics, the in-flight count, and
    (once a pool is attached) the pose service. REST and gRPC get the same ones."""

    settings: Settings
    metrics: ServiceMetrics
    admission: Admission
    service: PoseService | None = None

    @classmethod
    def create(cls, settings: Settings, admission: Admission | None = None) -> Serving:
        """``admission``: an in-flight count shared beyond this process (the front-ends of
        ``--api-processes``); by default one for the settings' limit. The only place one is built."""
        if admission is None:
            admission = Admission(settings.resolved_max_in_flight, settings.retry_after_s)
        metrics = ServiceMetrics()
        metrics.watch_admission(admission)
        return cls(settings, metrics, admission)

    def attach(self, pool: InferencePool, watcher: ModelRepositoryWatcher | None = None) -> PoseService:
        """Serve from ``pool`` (its versions managed by ``watcher``, if any): the pose service, the
        pool's batches observed and its state exported by :attr:`metrics`."""
        pool.add_observer(self.metrics)
        self.metrics.watch_pool(pool, watcher)
        self.service = PoseService(pool, self.settings, self.admission, watcher)
        return self.service
