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

A served model can be replaced by a new version while requests flow (:meth:`WorkerPool.swap_model`):
the new version's engines are built and checked on every device beside the old ones, then the
served (model, batcher) pair is replaced under the pool lock. A request takes the pair once
(:meth:`WorkerPool.lease`), so its crops, its pipeline and the batcher it submits to always belong
to one version; the old version keeps running what its requests queued and is freed (engines
closed, CUDA cache emptied) when the last request holding it has finished. At most two versions
of a model are resident: a swap waits for the previous old version to drain first.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ditepose.model.detectors import StagedDetector
from ditepose.service.batching.batcher import (
    Batch,
    DynamicBatcher,
    InferenceFailed,
    OutOfMemory,
    wait_for_batch,
)
from ditepose.service.batching.infer import InferFn, make_infer
from ditepose.service.core.model_loader import LoadedModel

log = logging.getLogger(__name__)

InferFactory = Callable[[LoadedModel, str], InferFn]
# check(model, infer, device) raises when the engine of a new version must not serve (see swap_model)
EngineCheck = Callable[[LoadedModel, InferFn, str], None]


class SwapRefused(RuntimeError):
    """A swap could not start: the previous old version of the model is still draining."""


class ServedModel:
    """One resident version of a model: what requests take together (see :meth:`WorkerPool.lease`)."""

    def __init__(self, model: LoadedModel, batcher: DynamicBatcher) -> None:
        self.model = model
        self.batcher = batcher
        self.leases = 0  # requests holding this version now
        self.retiring = False
        self.swapped_at = time.time()

    @property
    def version(self) -> str:
        return self.model.version

WORKER_STATES = ("starting", "idle", "busy", "stopped", "dead")


class BatchObserver(Protocol):
    """Receives one call per batch run (used for Prometheus metrics).

    Detection batches go to ``observe_detection(detector, device, size, infer_s, queued_s, ok)``
    when the observer has that method (optional: observers that only count pose batches skip it)."""

    def observe_batch(
        self, model: str, device: str, size: int, infer_s: float, queued_s: float, ok: bool, background: int = 0
    ) -> None:
        """``background``: how many of the ``size`` crops came from evaluation jobs."""


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation failure: CUDA's OutOfMemoryError, or the same error as text (a CPU
    allocator's, or one relayed from an engine process)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def release_cached_memory(device: str) -> None:
    """Hand the caching allocator's free blocks back (after an OOM, so the next batch finds them)."""
    if device.startswith("cuda"):
        import torch

        with contextlib.suppress(RuntimeError):  # a broken context must not take the worker down too
            torch.cuda.empty_cache()


@dataclass
class WorkerStatus:
    """A snapshot of one worker for /readyz and /metrics."""

    name: str
    device: str
    state: str
    alive: bool
    batches: int
    crops: int
    errors: int
    last_error: str | None
    out_of_memory: int = 0  # of the errors: batches shed because the device ran out of memory


class Worker:
    """One inference thread on one device, holding an infer callable per model."""

    def __init__(
        self,
        name: str,
        device: str,
        infers: dict[str, InferFn],
        batchers: Sequence[DynamicBatcher],
        observers: list[BatchObserver] | None = None,
        poll_s: float = 0.1,
        torch_threads: int | None = None,
    ) -> None:
        self.name = name
        self.device = device
        self.infers = infers
        self.batchers = list(batchers)
        self.observers = observers if observers is not None else []
        self.poll_s = poll_s
        self.torch_threads = torch_threads
        self.state = "starting"
        self.batches = 0
        self.crops = 0
        self.errors = 0
        self.out_of_memory = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ditepose-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def status(self) -> WorkerStatus:
        return WorkerStatus(
            self.name, self.device, self.state, self.alive, self.batches, self.crops, self.errors, self.last_error,
            self.out_of_memory,
        )

    def _run(self) -> None:
        try:
            if self.torch_threads:
                import torch

                # OpenMP thread counts are per calling thread: set it where inference runs.
                torch.set_num_threads(self.torch_threads)
            self.state = "idle"
            free_since = time.monotonic()
            while not self._stop.is_set():
                # a snapshot: models may join or leave the pool between two waits
                batch = wait_for_batch(list(self.batchers), self.poll_s, free_since)
                if batch is not None:
                    self.state = "busy"
                    self._run_batch(batch)
                    self.state = "idle"
                    free_since = time.monotonic()
            self.state = "stopped"
        except BaseException as exc:  # pragma: no cover - a bug in the loop itself
            self.state = "dead"
            self.last_error = repr(exc)
            log.exception("worker %s died", self.name)
            raise

    def _run_batch(self, batch: Batch) -> None:
        model = batch.batcher.name
        size = batch.size
        started = time.perf_counter()
        ok = True
        try:
            heatmaps = self.infers[batch.batcher.key](batch.tensor())
        except BaseException as exc:
            if not isinstance(exc, Exception):
                # The thread is about to die: its callers get an error now, not silence until the deadline.
                self.errors += 1
                batch.fail(InferenceFailed(f"worker {self.name} crashed: {type(exc).__name__}: {exc}"))
                raise
            ok = False
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if is_out_of_memory(exc):
                self.out_of_memory += 1
                release_cached_memory(self.device)
                log.warning("worker %s: out of memory on %s for a batch of %d crops of %s (shed with 503; "
                            "cached blocks released): %s", self.name, self.device, size, model, exc)
                batch.fail(OutOfMemory(f"out of memory on {self.device} for a batch of {size} crops; retry"))
            else:
                log.warning("worker %s: batch of %d crops for %s failed: %s", self.name, size, model, exc)
                batch.fail(InferenceFailed(f"inference failed on {self.device}: {type(exc).__name__}: {exc}"))
        else:
            batch.complete(heatmaps)
        infer_s = time.perf_counter() - started
        self.batches += 1
        self.crops += size
        detector = batch.batcher.detector
        for observer in self.observers:
            try:
                if detector is None:
                    observer.observe_batch(model, self.device, size, infer_s, batch.queued_s, ok,
                                           background=batch.background_size)
                elif hasattr(observer, "observe_detection"):
                    observer.observe_detection(detector, self.device, size, infer_s, batch.queued_s, ok)
            except Exception:  # metrics must never take a worker down
                log.exception("batch observer failed")


class WorkerPool:
    """Batchers (one per model) plus worker threads (``workers_per_device`` per device)."""

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
        observer: BatchObserver | None = None,
        torch_threads: int | None = None,
        worker_processes: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        if not devices:
            raise ValueError("a worker pool needs at least one device")
        self.models: dict[str, LoadedModel] = {m.name: m for m in models}  # the served version of each
        self.devices = list(devices)
        self.workers_per_device = workers_per_device
        self.precision = precision
        self.torch_threads = torch_threads
        self.worker_processes = worker_processes
        self.observers: list[BatchObserver] = [observer] if observer is not None else []
        self._infer_factory = infer_factory or (
            lambda m, device: make_infer(m.module, device, m.precision or precision, process=worker_processes,
                                         threads=torch_threads, cuda_graphs=cuda_graphs,
                                         max_batch_size=m.max_batch_size or max_batch_size,
                                         input_hw=(m.input_size[1], m.input_size[0]))
        )
        self.extra_models: dict[str, LoadedModel] = {}  # in the pool but not served (evaluation jobs)
        self.detectors: dict[str, StagedDetector] = {}  # detector name -> detector (batcher "detect:<name>")
        self.max_batch_size = max_batch_size
        self.max_delay_ms = max_delay_ms
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.condition = threading.Condition()
        self.batchers: dict[str, DynamicBatcher] = {
            name: self._new_batcher(name, max_batch_size=m.max_batch_size, version=m.version)
            for name, m in self.models.items()
        }
        self._served: dict[str, ServedModel] = {n: ServedModel(m, self.batchers[n]) for n, m in self.models.items()}
        self._retiring: dict[str, ServedModel] = {}  # name -> the old version still draining after a swap
        self._swap_locks: dict[str, threading.Lock] = {}
        self._generation = 0
        self.swaps: dict[str, int] = {}  # name -> completed swaps (Prometheus)
        self.model_requests: dict[tuple[str, str, str], int] = {}  # (name, version, ok|error) -> requests
        self._count_lock = threading.Lock()
        self.watcher = None  # the model repository watcher (service.core.repository_watcher), if any
        self.default_model: str | None = None  # set by from_settings when the settings name none
        self.workers: list[Worker] = []
        self.failed_models: dict[str, str] = {}  # name -> why it was not loaded
        self.restarts = 0
        self.supervise_s = 0.2
        self._supervisor: threading.Thread | None = None
        self._wake = threading.Event()
        self.started = False
        self.stopped = False

    @classmethod
    def from_settings(cls, settings, observer: BatchObserver | None = None) -> WorkerPool:
        """Load the configured models and lay out workers on the configured devices."""
        from ditepose.service.core.model_loader import load_models_isolated
        from ditepose.service.core.repository_watcher import ModelRepositoryWatcher

        watcher = ModelRepositoryWatcher(settings)
        specs = watcher.flag_specs()
        loaded, failed = load_models_isolated(specs, allow_none=watcher.repository is not None)
        loaded += watcher.initial_models({m.name for m in loaded} | set(failed))
        if not loaded:
            raise RuntimeError("no model could be loaded: " + ("; ".join(f"{n}: {r}" for n, r in failed.items())
                                                                  or f"the repository {watcher.repository} is empty"))
        pool = cls(
            loaded,
            settings.resolved_devices(),
            max_batch_size=settings.max_batch_size,
            max_delay_ms=settings.max_delay_ms,
            queue_size=settings.queue_size,
            timeout_s=settings.request_timeout_s,
            workers_per_device=settings.resolved_workers_per_device(),
            precision=settings.precision,
            observer=observer,
            torch_threads=settings.resolved_torch_threads(),
            worker_processes=settings.worker_processes,
            cuda_graphs=settings.cuda_graphs,
        )
        pool.failed_models = failed
        pool.default_model = settings.default_model or (specs[0].name if specs else loaded[0].name)
        watcher.attach(pool)
        return pool

    def start(self) -> WorkerPool:
        """Move the models to their devices and start the threads (idempotent)."""
        if self.started:
            return self
        if self.stopped:
            raise RuntimeError("a stopped pool cannot be restarted")
        for device in self.devices:
            def build(device: str = device) -> dict[str, InferFn]:
                return {self.batchers[name].key: self._infer_factory(m, device)
                        for name, m in {**self.models, **self.extra_models}.items()}

            detect = {detector_batcher_name(name): det.device_forward(device) for name, det in self.detectors.items()}
            shared = None if self._per_worker_engines(device) else build()
            # a device listed twice (two workers on one GPU) numbers on: names stay unique in metrics
            first = sum(1 for w in self.workers if w.device == device)
            for index in range(first, first + self.workers_per_device):
                infers = shared if shared is not None else build()
                self.workers.append(self._new_worker(f"{device}/{index}", device, {**infers, **detect}))
        for worker in self.workers:
            worker.start()
        self.started = True
        self._supervisor = threading.Thread(target=self._supervise, name="ditepose-supervisor", daemon=True)
        self._supervisor.start()
        log.info("worker pool: %d workers on %s; models %s", len(self.workers), self.devices,
                 {name: m.version for name, m in self.models.items()})
        if self.watcher is not None:
            self.watcher.start()
        return self

    def _new_worker(self, name: str, device: str, infers: dict[str, InferFn]) -> Worker:
        batchers = [*self.batchers.values(), *(entry.batcher for entry in self._retiring.values())]
        return Worker(name, device, infers, batchers, self.observers, torch_threads=self.torch_threads)

    def _supervise(self) -> None:
        """Replace worker threads that died (same device, same infer callables)."""
        while not self._wake.wait(self.supervise_s):
            for index, worker in enumerate(list(self.workers)):
                if self.stopped:
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
        if self.stopped:
            return
        self.stopped = True
        self._wake.set()
        if self.watcher is not None:
            self.watcher.stop()
        for batcher in [*self.batchers.values(), *(entry.batcher for entry in self._retiring.values())]:
            batcher.close()
        for worker in self.workers:
            worker.request_stop()
        with self.condition:
            self.condition.notify_all()
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        _close_engines([infer for worker in self.workers for infer in worker.infers.values()])

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_model(self, model: LoadedModel, served: bool = True) -> DynamicBatcher:
        """Serve ``model`` from now on, on every device and worker; returns its batcher.

        ``served=False`` keeps it out of :attr:`models` (what clients see), for a checkpoint
        that only an evaluation job uses; :meth:`remove_model` takes it out again."""
        if model.name in self.batchers:
            raise ValueError(f"the pool already has a model named {model.name!r}")
        batcher = self._new_batcher(model.name, max_batch_size=model.max_batch_size, version=model.version)
        infers = self._build_infers(model)
        with self.condition:
            if model.name in self.batchers:
                _close_engines(list(infers.values()))
                raise ValueError(f"the pool already has a model named {model.name!r}")
            for worker in self.workers:
                worker.infers[batcher.key] = infers[self._engine_key(worker)]
                worker.batchers.append(batcher)
            self.batchers[model.name] = batcher
            (self.models if served else self.extra_models)[model.name] = model
            if served:
                self._served[model.name] = ServedModel(model, batcher)
            self.failed_models.pop(model.name, None)
            self.condition.notify_all()
        return batcher

    def _engine_key(self, worker: Worker) -> str:
        """Workers of a device share one engine, except where each needs its own (engine processes)."""
        return worker.device if not self._per_worker_engines(worker.device) else worker.name

    def _build_infers(self, model: LoadedModel, check: EngineCheck | None = None) -> dict[str, InferFn]:
        """One engine of ``model`` per device (or per worker), each checked by ``check``; on any
        failure the engines built so far are closed and the error propagates."""
        infers: dict[str, InferFn] = {}
        try:
            for worker in self.workers:
                key = self._engine_key(worker)
                if key not in infers:
                    infers[key] = self._infer_factory(model, worker.device)
                    if check is not None:
                        check(model, infers[key], worker.device)
        except BaseException:
            _close_engines(list(infers.values()))
            raise
        return infers

    # ------------------------------------------------------------------ versions
    @contextlib.contextmanager
    def lease(self, name: str) -> Iterator[ServedModel]:
        """The served version of ``name`` (KeyError if none), held until the block ends: a swap
        meanwhile does not free it, so the caller's crops run on the version it prepared them for."""
        with self.condition:
            entry = self._served[name]
            entry.leases += 1
        try:
            yield entry
        finally:
            with self.condition:
                entry.leases -= 1
                if entry.retiring and entry.leases == 0:
                    self.condition.notify_all()

    def count_request(self, name: str, version: str, outcome: str) -> None:
        """A request answered by ``name``'s ``version`` (``outcome`` 'ok' or 'error'), for Prometheus."""
        key = (name, version, outcome)
        with self._count_lock:
            self.model_requests[key] = self.model_requests.get(key, 0) + 1

    def served(self, name: str) -> ServedModel:
        """The served version of ``name`` now (KeyError if none), without holding it."""
        return self._served[name]

    def retiring(self, name: str) -> ServedModel | None:
        """The old version of ``name`` still draining after a swap, if any."""
        return self._retiring.get(name)

    def resident_versions(self, name: str) -> list[str]:
        """Versions of ``name`` in memory now: the served one, then a draining one (at most two)."""
        entries = [self._served.get(name), self._retiring.get(name)]
        return [entry.version for entry in entries if entry is not None]

    def wait_drained(self, name: str, timeout_s: float) -> bool:
        """Wait until no old version of ``name`` is draining; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self.condition:
            while name in self._retiring:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.condition.wait(min(left, 0.5))
        return True

    def swap_model(self, model: LoadedModel, check: EngineCheck | None = None,
                   drain_timeout_s: float | None = None) -> ServedModel:
        """Serve ``model`` instead of the served version of its name (or beside the others, for a new name).

        The new engines are built and ``check``-ed on every device first (any exception: nothing
        changes and it propagates). Then, under the pool lock, the served pair is replaced: new
        requests get the new version, and the old one finishes what its requests queued and is
        freed once none holds it. A swap first waits up to ``drain_timeout_s`` (default: twice the
        request deadline, which bounds every queued item) for the previous old version to be
        freed, and raises :class:`SwapRefused` if it is still draining: at most two versions of
        a model are resident."""
        name = model.name
        with self.condition:
            lock = self._swap_locks.setdefault(name, threading.Lock())
        with lock:
            if not self.wait_drained(name, 2 * self.timeout_s + 5 if drain_timeout_s is None else drain_timeout_s):
                raise SwapRefused(f"model {name!r}: version {self._retiring[name].version} is still draining "
                                  "from the previous swap; at most two versions are resident")
            if name not in self._served:
                if name in self.batchers:
                    raise ValueError(f"{name!r} is not a served model of this pool")
                infers = self._build_infers(model, check)
                batcher = self._new_batcher(name, max_batch_size=model.max_batch_size, version=model.version)
                with self.condition:
                    for worker in self.workers:
                        worker.infers[batcher.key] = infers[self._engine_key(worker)]
                        worker.batchers.append(batcher)
                    self.batchers[name] = batcher
                    self.models[name] = model
                    entry = self._served[name] = ServedModel(model, batcher)
                    self.failed_models.pop(name, None)
                    self.condition.notify_all()
                log.info("model %r version %s now served", name, model.version)
                return entry
            infers = self._build_infers(model, check)
            with self.condition:
                self._generation += 1
                batcher = self._new_batcher(name, max_batch_size=model.max_batch_size, version=model.version,
                                            key=f"{name}#{self._generation}")
                for worker in self.workers:
                    worker.infers[batcher.key] = infers[self._engine_key(worker)]
                    worker.batchers.append(batcher)
                old = self._served[name]
                entry = self._served[name] = ServedModel(model, batcher)
                self.batchers[name] = batcher
                self.models[name] = model
                old.retiring = True
                self._retiring[name] = old
                self.swaps[name] = self.swaps.get(name, 0) + 1
                self.condition.notify_all()
            log.info("model %r: version %s now served; version %s drains", name, model.version, old.version)
            threading.Thread(target=self._retire, args=(old,), name=f"ditepose-retire-{name}", daemon=True).start()
            return entry

    def _retire(self, entry: ServedModel) -> None:
        """Free ``entry`` (an old version) once no request holds it and its queue is empty."""
        name = entry.model.name
        with self.condition:
            while not self.stopped and (entry.leases or not entry.batcher.idle):
                self.condition.wait(0.5)
            infers = []
            for worker in self.workers:
                if entry.batcher in worker.batchers:
                    worker.batchers.remove(entry.batcher)
                infer = worker.infers.pop(entry.batcher.key, None)
                if infer is not None:
                    infers.append(infer)
            if self._retiring.get(name) is entry:
                del self._retiring[name]
            self.condition.notify_all()
        entry.batcher.close(f"version {entry.version} of model {name!r} was replaced by version "
                            f"{self.models[name].version if name in self.models else '?'}; submit again")
        _close_engines(infers)
        version = entry.version
        del entry, infers
        release_memory(self.devices)
        log.info("model %r: version %s freed", name, version)

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
        batcher = self._new_batcher(key, max_batch_size=max_batch_size, detector=detector.name)
        forwards = {device: detector.device_forward(device) for device in dict.fromkeys(w.device for w in self.workers)}
        with self.condition:
            if key in self.batchers:  # a concurrent call won
                return self.batchers[key]
            for worker in self.workers:
                worker.infers[key] = forwards[worker.device]
                worker.batchers.append(batcher)
            self.batchers[key] = batcher
            self.detectors[detector.name] = detector
            self.condition.notify_all()
        return batcher

    def detector_batcher(self, name: str) -> DynamicBatcher | None:
        """The batcher of detector ``name`` if :meth:`add_detector` added it, else None."""
        return self.batchers.get(detector_batcher_name(name))

    def remove_model(self, name: str) -> None:
        """Stop serving ``name``: its queued crops fail with BatcherClosed, its engines are closed."""
        with self.condition:
            batcher = self.batchers.pop(name)
            self.models.pop(name, None)
            self.extra_models.pop(name, None)
            self._served.pop(name, None)
            old = self._retiring.pop(name, None)
            batchers = [batcher] if old is None else [batcher, old.batcher]
            infers = []
            for worker in self.workers:
                for b in batchers:
                    if b in worker.batchers:
                        worker.batchers.remove(b)
                    infer = worker.infers.pop(b.key, None)
                    if infer is not None:
                        infers.append(infer)
            self.condition.notify_all()
        for b in batchers:
            b.close()
        _close_engines(infers)

    def _per_worker_engines(self, device: str) -> bool:
        """Engine processes run one batch at a time: each worker has its own; others share the device's."""
        return self.worker_processes and device.startswith("cpu")

    def _new_batcher(self, name: str, max_batch_size: int | None = None, detector: str | None = None,
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
        return self.started and not self.stopped and bool(self.workers) and all(w.alive for w in self.workers)

    def queue_depths(self) -> dict[str, int]:
        """Live items waiting per batcher: crops for models, images for ``detect:<name>``."""
        depths = {name: b.depth for name, b in self.batchers.items()}
        for name, entry in list(self._retiring.items()):  # an old version's queue still counts
            depths[name] = depths.get(name, 0) + entry.batcher.depth
        return depths


def detector_batcher_name(detector: str) -> str:
    """The batcher key of a detector: its own namespace, so no model name can collide with it."""
    return f"detect:{detector}"


def release_memory(devices: Sequence[str]) -> None:
    """Give freed memory back: collect cycles, empty torch's CUDA cache, trim glibc's heap (Linux)."""
    gc.collect()
    if any(device.startswith("cuda") for device in devices):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _close_engines(infers: Sequence[InferFn]) -> None:
    """Close each distinct engine that holds resources (engine processes end with their model)."""
    closed: set[int] = set()
    for infer in infers:
        close = getattr(infer, "close", None)
        if close is not None and id(infer) not in closed:
            closed.add(id(infer))
            close()
