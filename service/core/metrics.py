"""Prometheus metrics of one app, in a registry of its own (tests build several apps)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ditepose.service.batching.worker import WORKER_STATES

if TYPE_CHECKING:
    from ditepose.service.batching.interface import InferencePool
    from ditepose.service.core.admission import Admission
    from ditepose.service.core.repository_watcher import ModelRepositoryWatcher

log = logging.getLogger(__name__)

# 1 ms and 2.5 ms buckets so early sheds (answered from the headers) are resolved, not lumped under 5 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class GpuMemory(NamedTuple):
    """What torch's caching allocator holds on one CUDA device, in bytes."""

    allocated: int
    reserved: int
    peak_allocated: int
    total: int


def cuda_memory(device: str) -> GpuMemory | None:
    """Memory of ``device`` seen by this process; None for non-CUDA devices or without CUDA.

    Reads only counters of a CUDA context this process already created (the pool's workers
    create it), so scraping never initialises CUDA itself.
    """
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return GpuMemory(
        torch.cuda.memory_allocated(index),
        torch.cuda.memory_reserved(index),
        torch.cuda.max_memory_allocated(index),
        torch.cuda.get_device_properties(index).total_memory,
    )


def gpu_memory_families(
    devices: list[str], memory_fn: Callable[[str], GpuMemory | None] = cuda_memory
) -> list[GaugeMetricFamily]:
    """``ditepose_gpu_memory_*_bytes{device}`` gauges; no samples on CPU-only processes."""
    names = (
        ("allocated", "Bytes held by live tensors on a CUDA device (this process)"),
        ("reserved", "Bytes reserved by torch's caching allocator on a CUDA device (this process)"),
        ("peak_allocated", "Highest allocated bytes on a CUDA device since start (this process)"),
        ("total", "Total memory of a CUDA device"),
    )
    families = [GaugeMetricFamily(f"ditepose_gpu_memory_{n}_bytes", h, labels=["device"]) for n, h in names]
    for device in dict.fromkeys(devices):
        memory = memory_fn(device)
        if memory is None:
            continue
        for family, value in zip(families, memory, strict=True):
            family.add_metric([device], float(value))
    return families


class PoolCollector(Collector):
    """Reads queue depth, worker state, model info and GPU memory from the pool at scrape time,
    and the version load failures from the repository watcher, if the pool has one."""

    def __init__(
        self, pool: InferencePool, watcher: ModelRepositoryWatcher | None = None,
        memory_fn: Callable[[str], GpuMemory | None] = cuda_memory,
    ) -> None:
        self.pool = pool
        self.watcher = watcher
        self.memory_fn = memory_fn

    def collect(self) -> Iterator[Metric]:
        yield from self._queue_families()
        yield from self._worker_families()
        yield from self._model_families()
        yield from self._version_families()
        yield from gpu_memory_families(list(self.pool.devices), self.memory_fn)

    def _queue_families(self) -> Iterator[Metric]:
        """Depth, sheds and expiries of every model's and detector's queue."""
        depth = GaugeMetricFamily("ditepose_queue_depth", "Crops waiting in a model's queue", labels=["model"])
        rejected = CounterMetricFamily(
            "ditepose_queue_rejected", "Submissions refused because the queue was full", labels=["model"]
        )
        expired = CounterMetricFamily(
            "ditepose_queue_expired", "Submissions that expired before a worker took them", labels=["model"]
        )
        detect_depth = GaugeMetricFamily(
            "ditepose_detection_queue_depth", "Images waiting in a person detector's queue", labels=["detector"]
        )
        detect_rejected = CounterMetricFamily(
            "ditepose_detection_queue_rejected", "Images refused because the detector's queue was full",
            labels=["detector"],
        )
        for name, batcher in list(self.pool.batchers.items()):
            if batcher.detector is not None:
                detect_depth.add_metric([batcher.detector], batcher.depth)
                detect_rejected.add_metric([batcher.detector], batcher.rejected)
                continue
            depth.add_metric([name], batcher.depth)
            rejected.add_metric([name], batcher.rejected)
            expired.add_metric([name], batcher.expired)
        yield from (depth, rejected, expired, detect_depth, detect_rejected)

    def _worker_families(self) -> Iterator[Metric]:
        """Each worker's state, errors and out-of-memory sheds."""
        state = GaugeMetricFamily(
            "ditepose_worker_state", "1 for the current state of each worker", labels=["worker", "device", "state"]
        )
        errors = CounterMetricFamily(
            "ditepose_worker_errors", "Batches whose inference raised", labels=["worker", "device"]
        )
        out_of_memory = CounterMetricFamily(
            "ditepose_worker_out_of_memory", "Batches shed because the device ran out of memory (503)",
            labels=["worker", "device"],
        )
        for status in self.pool.worker_status():
            current = status.state if status.alive or status.state == "stopped" else "dead"
            for name in WORKER_STATES:
                state.add_metric([status.name, status.device, name], 1.0 if name == current else 0.0)
            errors.add_metric([status.name, status.device], status.errors)
            out_of_memory.add_metric([status.name, status.device], status.out_of_memory)
        yield from (state, errors, out_of_memory)

    def _model_families(self) -> Iterator[Metric]:
        """What each served model is and how long it took to load."""
        info = GaugeMetricFamily(
            "ditepose_model_info",
            "Served models (value 1) with their arch, dataset and whether they run on random demo weights",
            labels=["model", "arch", "dataset", "demo_weights"],
        )
        load = GaugeMetricFamily("ditepose_model_load_seconds", "Time spent loading a model", labels=["model"])
        for m in list(self.pool.models.values()):
            info.add_metric([m.name, m.arch, m.dataset, str(m.demo_weights).lower()], 1.0)
            load.add_metric([m.name], m.load_s)
        yield from (info, load)

    def _version_families(self) -> Iterator[Metric]:
        """Per-version requests, swaps, rejected versions and the served version of each model."""
        pool = self.pool
        requests = CounterMetricFamily(
            "ditepose_model_requests", "Pose requests (REST, gRPC, stream frames) answered, by the model version "
            "that ran them; outcome ok or error", labels=["model", "version", "outcome"])
        for (name, version, outcome), count in list(pool.model_requests.items()):
            requests.add_metric([name, version, outcome], count)
        yield requests
        swaps = CounterMetricFamily("ditepose_model_swaps", "Times a new version of a model was swapped in while "
                                    "serving", labels=["model"])
        for name, count in list(pool.swaps.items()):
            swaps.add_metric([name], count)
        yield swaps
        failures = CounterMetricFamily(
            "ditepose_model_load_failures", "Versions that failed to load or failed their checks (strict keys, "
            "reference forward pass, finite outputs); the served version kept serving", labels=["model", "version"])
        load_failures = self.watcher.load_failures if self.watcher is not None else {}
        for (name, version), count in list(load_failures.items()):
            failures.add_metric([name, version], count)
        yield failures
        served = GaugeMetricFamily("ditepose_model_version_info", "The served version of each model (value 1) and "
                                   "the resident versions (served, or draining after a swap)",
                                   labels=["model", "version", "role"])
        for name, m in list(pool.models.items()):
            served.add_metric([name, m.version, "served"], 1.0)
            old = pool.retiring(name)
            if old is not None:
                served.add_metric([name, old.version, "draining"], 1.0)
        yield served


class AdmissionCollector(Collector):
    """In-flight requests, their limit and the requests shed before being read.

    ``ditepose_admission_rejected`` counts sheds by the in-flight limit (before the body is
    read); ``ditepose_queue_rejected`` counts the later ones by the queue's crop count. A shed
    request is in exactly one of them, so their sum is every overload answer."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("ditepose_in_flight_requests", "Pose requests admitted and not yet answered "
                                "(REST POST /v1/pose and gRPC Estimate)", value=self.admission.in_flight)
        yield GaugeMetricFamily("ditepose_in_flight_limit", "Most pose requests admitted at once",
                                value=self.admission.limit)
        rejected = CounterMetricFamily(
            "ditepose_admission_rejected", "Pose requests shed before being read because the in-flight limit "
            "was reached", labels=["transport"])
        for transport in ("rest", "grpc"):
            rejected.add_metric([transport], self.admission.rejected[transport])
        yield rejected


class ServiceMetrics:
    """Metric objects of one app; also the pool's :class:`~ditepose.service.batching.pool.BatchObserver`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "ditepose_http_requests", "HTTP requests by route and status", ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ditepose_http_request_duration_seconds", "HTTP request latency by route and status",
            ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "ditepose_batch_size", "Crops per forward pass", ["model", "device"], buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "ditepose_inference_duration_seconds", "Forward pass time of one batch", ["model", "device"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_wait = Histogram(
            "ditepose_queue_wait_seconds", "Time the oldest crop of a batch waited for a worker", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.background_crops = Counter(
            "ditepose_background_crops", "Crops of embedded evaluation jobs run in the serving batches", ["model"],
            registry=self.registry,
        )
        self.batch_errors = Counter(
            "ditepose_batch_errors", "Batches whose inference raised", ["model", "device"], registry=self.registry
        )
        self.detection_batch_size = Histogram(
            "ditepose_detection_batch_size", "Images per person-detector forward pass", ["detector", "device"],
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.detection = Histogram(
            "ditepose_detection_duration_seconds", "Person-detector forward pass time of one batch",
            ["detector", "device"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.detection_queue_wait = Histogram(
            "ditepose_detection_queue_wait_seconds", "Time the oldest image of a detection batch waited for a worker",
            ["detector"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.detection_errors = Counter(
            "ditepose_detection_batch_errors", "Detection batches whose forward pass raised", ["detector", "device"],
            registry=self.registry,
        )
        self._pool_collector: PoolCollector | None = None

    def watch_pool(self, pool: InferencePool, watcher: ModelRepositoryWatcher | None = None) -> None:
        """Export the pool's live state (queue depth, workers, models, versions) from this registry."""
        if self._pool_collector is not None:
            self.registry.unregister(self._pool_collector)
        self._pool_collector = PoolCollector(pool, watcher)
        self.registry.register(self._pool_collector)

    def watch_admission(self, admission: Admission) -> None:
        """Export the in-flight count and the early sheds of ``admission``."""
        self.registry.register(AdmissionCollector(admission))

    def observe_batch(
        self, model: str, device: str, size: int, infer_s: float, queued_s: float, ok: bool, background: int = 0
    ) -> None:
        self.batch_size.labels(model, device).observe(size)
        if background:
            self.background_crops.labels(model).inc(background)
        self.inference.labels(model, device).observe(infer_s)
        self.queue_wait.labels(model).observe(queued_s)
        if not ok:
            self.batch_errors.labels(model, device).inc()

    def observe_detection(
        self, detector: str, device: str, size: int, infer_s: float, queued_s: float, ok: bool
    ) -> None:
        self.detection_batch_size.labels(detector, device).observe(size)
        self.detection.labels(detector, device).observe(infer_s)
        self.detection_queue_wait.labels(detector).observe(queued_s)
        if not ok:
            self.detection_errors.labels(detector, device).inc()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route, str(status)).observe(seconds)


class GpuMemoryGauges:
    """The GPU memory gauges for processes scraped through a shared registry (Celery pool children).

    In ``prometheus_client`` multiprocess mode each child writes its own values (``liveall``:
    one series per live pid); :meth:`update` reads the devices this process has initialised.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None,
        memory_fn: Callable[[str], GpuMemory | None] = cuda_memory,
    ) -> None:
        from prometheus_client import Gauge

        self.registry = registry if registry is not None else CollectorRegistry()
        self.memory_fn = memory_fn
        self.gauges = {
            family.name: Gauge(
                family.name, family.documentation, ["device"], registry=self.registry, multiprocess_mode="liveall"
            )
            for family in gpu_memory_families([])
        }

    def update(self, devices: list[str] | None = None) -> None:
        for family in gpu_memory_families(devices if devices is not None else _initialised_cuda_devices(),
                                          self.memory_fn):
            gauge = self.gauges[family.name]
            for sample in family.samples:
                gauge.labels(sample.labels["device"]).set(sample.value)


def _initialised_cuda_devices() -> list[str]:
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def start_gpu_memory_sampler(
    interval_s: float = 5.0, gauges: GpuMemoryGauges | None = None, stop: threading.Event | None = None
) -> threading.Thread:
    """Update :class:`GpuMemoryGauges` every ``interval_s`` in a daemon thread (until ``stop`` is set)."""
    gauges = gauges or GpuMemoryGauges()
    stop = stop or threading.Event()

    def loop() -> None:
        while True:
            try:
                gauges.update()
            except Exception:  # metrics must never take a worker down
                log.exception("GPU memory sampling failed")
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=loop, name="ditepose-gpu-memory", daemon=True)
    thread.start()
    return thread
