"""One inference thread on one device (:class:`Worker`), what it reports (:class:`WorkerStatus`,
:class:`BatchObserver`), and the two helpers that put a batcher on workers and take it off again.

A worker pulls batches from every batcher it holds (one per served model version, one per
person detector) and runs each with the engine its ``infers`` holds under the batcher's key.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ditepose.service.batching.batcher import (
    Batch,
    DynamicBatcher,
    InferenceFailed,
    OutOfMemory,
    wait_for_batch,
)
from ditepose.service.batching.infer import InferFn

log = logging.getLogger(__name__)

WORKER_STATES = ("starting", "idle", "busy", "stopped", "dead")
# A worker trims the heap once no batch has run for this long and the queues are empty: a burst's
# short lulls (a batch being assembled, requests between the detector and the pose queue) do not
# count, so a trim never hands back pages the next batch faults in again at once.
TRIM_AFTER_IDLE_S = 1.0


class BatchObserver(Protocol):
    """Receives one call per pose batch run (used for Prometheus metrics)."""

    def observe_batch(
        self, model: str, device: str, size: int, infer_s: float, queued_s: float, ok: bool, background: int = 0
    ) -> None:
        """``background``: how many of the ``size`` crops came from evaluation jobs."""


@runtime_checkable
class DetectionObserver(Protocol):
    """An observer that also counts person-detection batches (optional: observers that only count
    pose batches do not implement it, and are not told about detection batches)."""

    def observe_detection(
        self, detector: str, device: str, size: int, infer_s: float, queued_s: float, ok: bool
    ) -> None:
        """One detection batch of ``size`` images run by ``detector`` on ``device``."""


def notify_observers(observers: Sequence[BatchObserver], detector: str | None, args: tuple[Any, ...]) -> None:
    """Report one batch to every observer: a pose batch (``detector`` None) as ``observe_batch(*args)``,
    a detection batch as ``observe_detection(detector, *args)`` to the observers that count those.
    An observer that raises is logged and skipped: metrics must never take a worker down."""
    for observer in observers:
        try:
            if detector is None:
                observer.observe_batch(*args)
            elif isinstance(observer, DetectionObserver):
                observer.observe_detection(detector, *args)
        except Exception:
            log.exception("batch observer failed")


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


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        library = ctypes.CDLL(name)
    except OSError:
        return None
    trim = getattr(library, "malloc_trim", None)  # a C symbol, absent outside glibc
    return trim if callable(trim) else None


class HeapTrimmer:
    """Hands the C heap's free pages back to the kernel (glibc ``malloc_trim(0)``) when the pool goes idle.

    Why: a burst frees hundreds of MiB (crops, forward buffers, detector inputs, decoded images)
    into glibc's arenas, which keep them: RSS stayed near the bursts' level, +1,284 MiB over idle
    after three bursts at the admission limit (bench/bursts.py, 2-core Xeon). Trimmed when the
    queues drain, growth was +279 MiB with the same answers per second. Not per batch:
    trimming walks every arena and holds its lock, so only once per busy spell, by one worker
    at a time. One per process (the heap is the process's): ``enabled`` is the setting
    ``trim_memory_when_idle``."""

    def __init__(self) -> None:
        self.enabled = True
        self.trims = 0
        self._malloc_trim = _load_malloc_trim()
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self._malloc_trim is not None

    def trim(self, force: bool = False) -> bool:
        """Trim now unless disabled (``force`` overrides it), unavailable or already under way elsewhere."""
        if (not self.enabled and not force) or self._malloc_trim is None:
            return False
        if not self._lock.acquire(blocking=False):
            return False  # another worker is trimming the same heap right now
        try:
            self._malloc_trim(0)
            self.trims += 1
        finally:
            self._lock.release()
        return True


heap_trimmer = HeapTrimmer()


def all_idle(batchers: Sequence[DynamicBatcher]) -> bool:
    """Nothing queued, announced or running in any of ``batchers`` (they share one condition)."""
    if not batchers:
        return True
    with batchers[0].condition:
        return all(batcher.idle for batcher in batchers)


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
            ran_since_trim = False
            while not self._stop.is_set():
                # a snapshot: models may join or leave the pool between two waits
                batchers = list(self.batchers)
                batch = wait_for_batch(batchers, self.poll_s, free_since)
                if batch is not None:
                    self.state = "busy"
                    self._run_batch(batch)
                    self.state = "idle"
                    free_since = time.monotonic()
                    ran_since_trim = True
                elif ran_since_trim and time.monotonic() - free_since >= TRIM_AFTER_IDLE_S and all_idle(batchers):
                    heap_trimmer.trim()
                    ran_since_trim = False
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
        args = (self.device, size, infer_s, batch.queued_s, ok)
        notify_observers(self.observers, detector, (model, *args, batch.background_size) if detector is None else args)


def attach_batcher(
    workers: Sequence[Worker], batcher: DynamicBatcher, infers: Mapping[str, InferFn],
    engine_key: Callable[[Worker], str],
) -> None:
    """Have every worker run ``batcher``'s batches with its engine (``infers[engine_key(worker)]``).
    The caller holds the pool's condition (workers read their batchers under it)."""
    for worker in workers:
        worker.infers[batcher.key] = infers[engine_key(worker)]
        worker.batchers.append(batcher)


def detach_batchers(workers: Sequence[Worker], batchers: Sequence[DynamicBatcher]) -> list[InferFn]:
    """Take ``batchers`` off every worker; returns the engines they ran with (for the caller to
    close once nothing runs them). The caller holds the pool's condition."""
    infers = []
    for worker in workers:
        for batcher in batchers:
            if batcher in worker.batchers:
                worker.batchers.remove(batcher)
            infer = worker.infers.pop(batcher.key, None)
            if infer is not None:
                infers.append(infer)
    return infers


@runtime_checkable
class ClosableEngine(Protocol):
    """An engine that holds resources beyond memory (an engine process, CUDA graphs): it has ``close``."""

    def close(self) -> None: ...


def close_engines(infers: Sequence[InferFn]) -> None:
    """Close each distinct engine that holds resources (engine processes end with their model)."""
    closed: set[int] = set()
    for infer in infers:
        if isinstance(infer, ClosableEngine) and id(infer) not in closed:
            closed.add(id(infer))
            infer.close()


def release_memory(devices: Sequence[str]) -> None:
    """Give freed memory back: collect cycles, empty torch's CUDA cache, trim glibc's heap (Linux)."""
    gc.collect()
    if any(device.startswith("cuda") for device in devices):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    heap_trimmer.trim(force=True)
