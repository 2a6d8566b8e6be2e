"""Worker threads, one or more per device, each serving every model through its batcher.

REST, gRPC and embedded evaluation jobs share one :class:`WorkerPool`: they submit crops to
``pool.batcher(model_name)`` (jobs as background submissions, which yield to live requests)
and the workers run the batches. A model can join a running pool and leave it again
(:meth:`WorkerPool.add_model`), e.g. a checkpoint an evaluation job names. Person detection
runs on the same workers and devices (:meth:`WorkerPool.add_detector`): a detector's batcher
queues preprocessed images from many requests and the workers run them as one batch, so a GPU
host detects on the GPU. A worker whose forward pass
raises fails only that batch (its callers get :class:`~ditepose.service.batching.batcher.InferenceFailed`)
and keeps serving. A worker thread that dies anyway (a fault below Python's ``Exception``,
e.g. ``SystemExit`` from a native extension wrapper) first fails its in-flight batch, then
the pool's supervisor replaces it with a fresh thread on the same device.

A served model can be replaced by a new version while requests flow (:meth:`WorkerPool.swap_model`;
the versions, leases, swaps and drains are :class:`~ditepose.service.batching.versions.ModelVersions`'
business). The pool knows nothing of settings files or model repositories: the composition root
(:func:`ditepose.service.core.serving.build_pool`) loads the models, builds the pool and the
repository watcher that swaps versions in.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from ditepose.model.detectors import StagedDetector
from ditepose.service.batching.batcher import DynamicBatcher
from ditepose.service.batching.infer import InferFn, make_served_engine
from ditepose.service.batching.loaded_model import LoadedModel
from ditepose.service.batching.versions import EngineCheck, ModelVersions, ServedModel
from ditepose.service.batching.worker import (
    BatchObserver,
    Worker,
    WorkerStatus,
    attach_batcher,
    close_engines,
    detach_batchers,
)

log = logging.getLogger(__name__)

InferFactory = Callable[[LoadedModel, str], InferFn]


class WorkerPool:
    """Batchers (one per model) plus worker threads (``workers_per_device`` per device).

    Implements :class:`~ditepose.service.batching.interface.InferencePool`."""

    def __init__(
        self,
        models: Sequence[LoadedModel],
        devices: Sequence[str],
        *,
        max_batch_size: int = 32,
        max_delay_ms: float = 5.0,
        queue_size: int = 512,
        timeout_s: float = 30.0,
        workers_per_device: int = 1,
        infer_factory: InferFactory | None = None,
        precision: str = "auto",
        engine: str = "auto",
        observer: BatchObserver | None = None,
        torch_threads: int | None = None,
        worker_processes: bool = False,
        cuda_graphs: bool = False,
        default_model: str | None = None,
        failed_models: Mapping[str, str] | None = None,
    ) -> None:
        if not devices:
            raise ValueError("a worker pool needs at least one device")
        self.models: dict[str, LoadedModel] = {m.name: m for m in models}  # the served version of each
        self.devices = list(devices)
        self.workers_per_device = workers_per_device
        self.precision = precision
        self.engine = engine
        self.torch_threads = torch_threads
        self.worker_processes = worker_processes
        self.observers: list[BatchObserver] = [observer] if observer is not None else []
        self.cuda_graphs = cuda_graphs
        self._infer_factory = infer_factory or self._served_engine
        self._may_serve_openvino = infer_factory is None and engine != "torch"  # an own engine per CPU worker
        self.extra_models: dict[str, LoadedModel] = {}  # in the pool but not served (evaluation jobs)
        self.detectors: dict[str, StagedDetector] = {}  # detector name -> detector (batcher "detect:<name>")
        self.max_batch_size = max_batch_size
        self.max_delay_ms = max_delay_ms
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.condition = threading.Condition()
        self.versions = ModelVersions(self, drain_timeout_s=2 * timeout_s + 5)
        self.batchers: dict[str, DynamicBatcher] = {}
        for name, m in self.models.items():
            self.batchers[name] = self.new_batcher(name, max_batch_size=m.max_batch_size, version=m.version)
            self.versions.serve(m, self.batchers[name])
        self.default_model = default_model  # of requests that name none (None: the service's settings say)
        self.workers: list[Worker] = []
        self.failed_models: dict[str, str] = dict(failed_models or {})  # name -> why it was not loaded
        self.restarts = 0
        self.supervise_s = 0.2
        self._supervisor: threading.Thread | None = None
        self._wake = threading.Event()
        self.started = False
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    # ------------------------------------------------------------------ life
    def start(self) -> WorkerPool:
        """Move the models to their devices and start the threads (idempotent)."""
        if self.started:
            return self
        if self._stopped:
            raise RuntimeError("a stopped pool cannot be restarted")
        for device in self.devices:
            self._add_workers(device)
        for worker in self.workers:
            worker.start()
        self.started = True
        self._supervisor = threading.Thread(target=self._supervise, name="ditepose-supervisor", daemon=True)
        self._supervisor.start()
        log.info("worker pool: %d workers on %s; models %s", len(self.workers), self.devices,
                 {name: m.version for name, m in self.models.items()})
        return self

    def _add_workers(self, device: str) -> None:
        """``workers_per_device`` workers on ``device``, sharing its engines unless each needs its own."""
        def build(previous: dict[str, InferFn]) -> dict[str, InferFn]:
            infers = {}
            for name, m in list({**self.models, **self.extra_models}.items()):
                key = self.batchers[name].key
                try:
                    infers[key] = self._worker_engine(m, device, previous.get(key))
                except Exception as exc:  # this model's engine is refused here: the others still serve
                    self._not_served(name, exc)
            return infers

        detect = {detector_batcher_name(name): det.device_forward(device) for name, det in self.detectors.items()}
        shared = None if self._per_worker_engines(device) else build({})
        # a device listed twice (two workers on one GPU) numbers on: names stay unique in metrics
        first = sum(1 for w in self.workers if w.device == device)
        infers: dict[str, InferFn] = {}
        for index in range(first, first + self.workers_per_device):
            infers = shared if shared is not None else build(infers)
            self.workers.append(self._new_worker(f"{device}/{index}", device, {**infers, **detect}))

    def _not_served(self, name: str, exc: Exception) -> None:
        """Take ``name`` out at start-up because its engine cannot be built (e.g. a precision the
        agreement gate refuses, an engine that is not installed): reported like a model that failed to
        load (``failed_models``, /v1/models ``failed``). Raises when no model would be left."""
        reason = f"{type(exc).__name__}: {exc}"
        self.failed_models[name] = reason[:500] + "..." if len(reason) > 500 else reason
        log.error("model %r is not served: its engine was refused: %s", name, reason)
        self.batchers.pop(name).close()
        for batcher in self.versions.forget(name):
            batcher.close()
        self.models.pop(name, None)
        self.extra_models.pop(name, None)
        if not self.models:
            raise RuntimeError("no model could be served: " + "; ".join(f"{n}: {r}" for n, r in self.failed_models.items()))

    def _new_worker(self, name: str, device: str, infers: dict[str, InferFn]) -> Worker:
        batchers = [*self.batchers.values(), *(entry.batcher for entry in self.versions.draining())]
        return Worker(name, device, infers, batchers, self.observers, torch_threads=self.torch_threads)

    def _supervise(self) -> None:
        """Replace worker threads that died (same device, same infer callables)."""
        while not self._wake.wait(self.supervise_s):
            for index, worker in enumerate(list(self.workers)):
                if self._stopped:
                    return
                if worker.alive or worker.state == "stopped":
                    continue
                self.restarts += 1
                replacement = self._new_worker(f"{worker.device}/{index}.r{self.restarts}", worker.device, worker.infers)
                self.workers[index] = replacement
                replacement.start()
                log.error("worker %s died (%s); replaced by %s", worker.name, worker.last_error, replacement.name)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Fail queued requests, stop the threads and wait for them."""
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        for batcher in [*self.batchers.values(), *(entry.batcher for entry in self.versions.draining())]:
            batcher.close()
        for worker in self.workers:
            worker.request_stop()
        with self.condition:
            self.condition.notify_all()
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        close_engines([infer for worker in self.workers for infer in worker.infers.values()])

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ models and detectors
    def add_model(self, model: LoadedModel, served: bool = True) -> DynamicBatcher:
        """Serve ``model`` from now on, on every device and worker; returns its batcher.

        ``served=False`` keeps it out of :attr:`models` (what clients see), for a checkpoint
        that only an evaluation job uses; :meth:`remove_model` takes it out again."""
        if model.name in self.batchers:
            raise ValueError(f"the pool already has a model named {model.name!r}")
        batcher = self.new_batcher(model.name, max_batch_size=model.max_batch_size, version=model.version)
        infers = self.build_infers(model)
        with self.condition:
            if model.name in self.batchers:
                close_engines(list(infers.values()))
                raise ValueError(f"the pool already has a model named {model.name!r}")
            self.attach(batcher, infers)
            self.batchers[model.name] = batcher
            (self.models if served else self.extra_models)[model.name] = model
            if served:
                self.versions.serve(model, batcher)
            self.failed_models.pop(model.name, None)
            self.condition.notify_all()
        return batcher

    def remove_model(self, name: str) -> None:
        """Stop serving ``name``: its queued crops fail with BatcherClosed, its engines are closed."""
        with self.condition:
            batcher = self.batchers.pop(name)
            self.models.pop(name, None)
            self.extra_models.pop(name, None)
            batchers = [batcher, *self.versions.forget(name)]
            infers = self.detach(batchers)
            self.condition.notify_all()
        for b in batchers:
            b.close()
        close_engines(infers)

    def add_detector(self, detector: StagedDetector, max_batch_size: int = 8) -> DynamicBatcher:
        """Run ``detector``'s device stage on every device and worker from now on; returns its
        batcher (named ``detect:<name>``), which takes preprocessed images [P, 3, H, W] and answers
        candidates [P, K, 5]. Idempotent per detector name (the first detector of a name stays).

        Its queue is bounded like a model's (``queue_size`` images) but batches are smaller: a
        detector input is several times a pose crop's size."""
        key = detector_batcher_name(detector.name)
        with self.condition:
            if key in self.batchers:
                return self.batchers[key]
        batcher = self.new_batcher(key, max_batch_size=max_batch_size, detector=detector.name)
        forwards = {device: detector.device_forward(device) for device in dict.fromkeys(w.device for w in self.workers)}
        with self.condition:
            if key in self.batchers:  # a concurrent call won
                return self.batchers[key]
            attach_batcher(self.workers, batcher, forwards, engine_key=lambda worker: worker.device)
            self.batchers[key] = batcher
            self.detectors[detector.name] = detector
            self.condition.notify_all()
        return batcher

    def detector_batcher(self, name: str) -> DynamicBatcher | None:
        """The batcher of detector ``name`` if :meth:`add_detector` added it, else None."""
        return self.batchers.get(detector_batcher_name(name))

    # ------------------------------------------------------------------ engines and batchers
    def _served_engine(self, model: LoadedModel, device: str) -> InferFn:
        """The default engine factory: :func:`make_served_engine` with the model's own options over
        the pool's; the choice (backend, precision, why, agreement) is recorded on the model."""
        shared_by = 1 if self._per_worker_engines(device) else self.workers_per_device
        infer, choice = make_served_engine(
            model.module, device, model.precision or self.precision, process=self.worker_processes,
            threads=self.torch_threads, cuda_graphs=self.cuda_graphs,
            max_batch_size=model.max_batch_size or self.max_batch_size,
            input_hw=(model.input_size[1], model.input_size[0]), engine=model.engine or self.engine,
            shared_by=shared_by)
        model.engines[device] = choice.to_dict()
        return infer

    def _worker_engine(self, model: LoadedModel, device: str, sibling: InferFn | None) -> InferFn:
        """A new engine for one more worker (or device), or ``sibling`` (the engine another worker of the
        device got) where a per-worker engine buys nothing: the pool's own factory chose a torch engine
        (OpenVINO absent or refused) outside engine processes, so the device's workers share it."""
        from ditepose.model.engines.openvino import OpenVinoEngine

        shareable = self._may_serve_openvino and not self.worker_processes and not isinstance(sibling, OpenVinoEngine)
        return sibling if sibling is not None and shareable else self._infer_factory(model, device)

    def _engine_key(self, worker: Worker) -> str:
        """Workers of a device share one engine, except where each needs its own (engine processes)."""
        return worker.device if not self._per_worker_engines(worker.device) else worker.name

    def _per_worker_engines(self, device: str) -> bool:
        """On a CPU each worker has its own engine where one runs one batch at a time (an engine
        process) or where the pool's own factory may serve OpenVINO (latency mode: one engine per worker
        thread, its own threads); otherwise (a caller's ``infer_factory`` included) the workers of a device
        share one engine."""
        return device.startswith("cpu") and (self.worker_processes or self._may_serve_openvino)

    def build_infers(self, model: LoadedModel, check: EngineCheck | None = None) -> dict[str, InferFn]:
        """One engine of ``model`` per device (or per worker), each checked by ``check``; on any
        failure the engines built so far are closed and the error propagates."""
        infers: dict[str, InferFn] = {}
        on_device: dict[str, InferFn] = {}  # the last engine built per device
        try:
            for worker in self.workers:
                key = self._engine_key(worker)
                if key not in infers:
                    infers[key] = on_device[worker.device] = self._worker_engine(model, worker.device,
                                                                                 on_device.get(worker.device))
                    if check is not None:
                        check(model, infers[key], worker.device)
        except BaseException:
            close_engines(list(infers.values()))
            raise
        return infers

    def attach(self, batcher: DynamicBatcher, infers: dict[str, InferFn]) -> None:
        """Put a model version's batcher on every worker, with the engines :meth:`build_infers` made
        (the caller holds :attr:`condition`)."""
        attach_batcher(self.workers, batcher, infers, self._engine_key)

    def detach(self, batchers: Sequence[DynamicBatcher]) -> list[InferFn]:
        """Take ``batchers`` off every worker; returns their engines (the caller holds :attr:`condition`)."""
        return detach_batchers(self.workers, batchers)

    def new_batcher(self, name: str, max_batch_size: int | None = None, detector: str | None = None,
                    version: str | None = None, key: str | None = None) -> DynamicBatcher:
        return DynamicBatcher(
            name,
            max_batch_size=max_batch_size or self.max_batch_size,
            max_delay_ms=self.max_delay_ms,
            queue_size=self.queue_size,
            default_timeout_s=self.timeout_s,
            condition=self.condition,
            detector=detector,
            key=key,
            version=version,
        )

    # ------------------------------------------------------------------ versions (see ModelVersions)
    def lease(self, name: str) -> contextlib.AbstractContextManager[ServedModel]:
        return self.versions.lease(name)

    def count_request(self, name: str, version: str, outcome: str) -> None:
        self.versions.count_request(name, version, outcome)

    def served(self, name: str) -> ServedModel:
        return self.versions.served(name)

    def retiring(self, name: str) -> ServedModel | None:
        return self.versions.retiring(name)

    def resident_versions(self, name: str) -> list[str]:
        return self.versions.resident_versions(name)

    def wait_drained(self, name: str, timeout_s: float | None = None) -> bool:
        return self.versions.wait_drained(name, timeout_s)

    def swap_model(self, model: LoadedModel, check: EngineCheck | None = None,
                   drain_timeout_s: float | None = None) -> ServedModel:
        """Serve ``model`` instead of the served version of its name: :meth:`ModelVersions.swap`."""
        return self.versions.swap(model.name, lambda: model, check, drain_timeout_s)

    def load_and_swap(self, name: str, load: Callable[[], LoadedModel], check: EngineCheck | None = None,
                      drain_timeout_s: float | None = None) -> ServedModel:
        """Like :meth:`swap_model`, but the new version is loaded (``load()``) only once the previous
        old version has drained: a third version is never in memory."""
        return self.versions.swap(name, load, check, drain_timeout_s)

    @property
    def swaps(self) -> dict[str, int]:
        return self.versions.swaps

    @property
    def model_requests(self) -> dict[tuple[str, str, str], int]:
        return self.versions.model_requests

    # ------------------------------------------------------------------ what callers read
    def add_observer(self, observer: BatchObserver) -> None:
        """Also report every batch to ``observer`` (e.g. a second front-end's metrics)."""
        if observer not in self.observers:
            self.observers.append(observer)

    def batcher(self, model: str) -> DynamicBatcher:
        """The batcher of ``model``; KeyError for an unknown name."""
        return self.batchers[model]

    def model(self, name: str) -> LoadedModel:
        """A model in the pool, served or not; KeyError for an unknown name."""
        return self.models[name] if name in self.models else self.extra_models[name]

    def worker_status(self) -> list[WorkerStatus]:
        return [worker.status() for worker in self.workers]

    @property
    def ready(self) -> bool:
        return self.started and not self._stopped and bool(self.workers) and all(w.alive for w in self.workers)

    def queue_depths(self) -> dict[str, int]:
        """Live items waiting per batcher: crops for models, images for ``detect:<name>``."""
        depths = {name: b.depth for name, b in self.batchers.items()}
        for entry in self.versions.draining():  # an old version's queue still counts
            name = entry.model.name
            depths[name] = depths.get(name, 0) + entry.batcher.depth
        return depths


def detector_batcher_name(detector: str) -> str:
    """The batcher key of a detector: its own namespace, so no model name can collide with it."""
    return f"detect:{detector}"
