"""The front-end's pool: an :class:`~ditepose.service.batching.interface.InferencePool` (the surface
:class:`~ditepose.service.core.pose_service.PoseService`, the REST app and the gRPC server use of
a pool), answered by the inference host over a pipe (control) and shared memory (tensors).

Crops go into a slot of this front-end's :class:`~.slots.SlotArena`; the host submits them to
its real :class:`~ditepose.service.batching.batcher.DynamicBatcher` (so crops of every front-end,
REST and gRPC, meet in one batch) and writes the heatmaps back into the same slot. The host's
outcome keeps its meaning here: its ``Overloaded`` / ``DeadlineExceeded`` / ``InferenceFailed``
/ ``BatcherClosed`` are raised as the same classes, so they map to the same error codes
(:func:`~ditepose.service.core.errors.from_batcher_error`) as in one process.
Announcements (:meth:`RemoteBatcher.announce`) are forwarded, so the host's workers keep a batch
open for crops a front-end is still decoding. Worker states, queue depths and batch
observations come from the host (a status message every ``STATUS_PERIOD_S``, the batches
observed since the last one), so /readyz and /metrics of every front-end show the whole host.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import operator
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, overload

import torch

from ditepose.model.detectors import StagedDetector
from ditepose.service.batching.batcher import (
    BatcherClosed,
    BatcherError,
    DeadlineExceeded,
    Overloaded,
    answer_if_empty,
)
from ditepose.service.batching.loaded_model import LoadedModel
from ditepose.service.batching.pool import detector_batcher_name
from ditepose.service.batching.worker import BatchObserver, WorkerStatus, notify_observers
from ditepose.service.core.errors import BATCHER_OUTCOMES
from ditepose.service.host.slots import SlotArena, dtype_name, dtype_of

log = logging.getLogger(__name__)

STATUS_PERIOD_S = 0.25
# The host enforces each submission's deadline and always answers; a front-end waits this much
# longer for that answer before it gives up on its own (the host is then stuck or gone).
REPLY_MARGIN_S = 2.0

# The batcher's error classes by name (they cross the pipe as names), in the order of core's one
# table of batcher outcomes: subclasses before their bases.
ERRORS: dict[str, type[BatcherError]] = {cls.__name__: cls for cls, _code in BATCHER_OUTCOMES}


@dataclass
class BatcherStats:
    """One host batcher as a front-end sees it."""

    detector: str | None
    depth: int
    background_depth: int
    rejected: int
    expired: int
    queue_size: int
    max_batch_size: int


@dataclass
class HostStatus:
    """The host's state, pushed to every front-end every ``STATUS_PERIOD_S``."""

    ready: bool
    workers: list[WorkerStatus]
    batchers: dict[str, BatcherStats]
    models: dict[str, LoadedModel]
    failed_models: dict[str, str]
    devices: list[str]
    restarts: int = 0  # front-end restarts so far
    batches: list[tuple[Any, ...]] = field(default_factory=list)  # observations since the last status


def describe_model(model: LoadedModel) -> LoadedModel:
    """What a front-end needs of a model (no module: the network lives in the host only)."""
    from dataclasses import replace

    return replace(model, module=None)  # type: ignore[arg-type]


def error_kind(exc: BaseException) -> str:
    """The name an error crosses the pipe as: its batcher class, or ``BatcherError`` for others."""
    for name, cls in ERRORS.items():
        if isinstance(exc, cls):
            return name
    return "BatcherError"


def make_error(kind: str, message: str) -> BatcherError:
    """The front-end's copy of an error the host named with :func:`error_kind`."""
    return ERRORS.get(kind, BatcherError)(message)


class RemoteArrival:
    """The front-end's half of :class:`~ditepose.service.batching.batcher.Arrival`."""

    def __init__(self, pool: RemotePool, arrival_id: int) -> None:
        self.pool = pool
        self.id = arrival_id
        self.settled = False

    def settle(self) -> None:
        if not self.settled:
            self.settled = True
            self.pool._send(("settle", self.id))


class _Reported:
    """A :class:`RemoteBatcher` count the host reports: the field of the same name of the batcher's
    latest :class:`BatcherStats` (each status replaces them all)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._read = operator.attrgetter(name)

    @overload
    def __get__(self, batcher: None, owner: type) -> _Reported: ...

    @overload
    def __get__(self, batcher: RemoteBatcher, owner: type | None = None) -> int: ...

    def __get__(self, batcher: RemoteBatcher | None, owner: type | None = None) -> int | _Reported:
        return self if batcher is None else int(self._read(batcher.stats))


class RemoteBatcher:
    """A host batcher, seen from a front-end (same calls as a DynamicBatcher's front-end side)."""

    def __init__(self, pool: RemotePool, name: str, stats: BatcherStats, detector: str | None = None) -> None:
        self.pool = pool
        self.name = name
        self.detector = detector
        self.stats = stats
        self.default_timeout_s = pool.timeout_s
        self.local_rejected = 0  # sheds by check_admission here, before anything reached the host
        self._what = f"detector {detector!r}" if detector else f"model {name!r}"

    # What the host last reported of its batcher (the same names as a DynamicBatcher's).
    queue_size = _Reported()
    max_batch_size = _Reported()
    depth = _Reported()
    background_depth = _Reported()
    expired = _Reported()

    @property
    def rejected(self) -> int:
        return self.stats.rejected + self.local_rejected

    def check_admission(self) -> None:
        """Shed early by the depth the host last reported; the host's submit has the final say."""
        if self.stats.depth >= self.stats.queue_size:
            self.local_rejected += 1
            raise Overloaded(f"queue of {self._what} is full ({self.stats.depth} waiting)")

    def announce(self) -> RemoteArrival:
        arrival = RemoteArrival(self.pool, next(self.pool._ids))
        self.pool._send(("announce", arrival.id, self.name))
        return arrival

    def _wait_s(self, timeout_s: float | None) -> float:
        return (self.default_timeout_s if timeout_s is None else timeout_s) + REPLY_MARGIN_S

    async def submit(
        self, crops: torch.Tensor, timeout_s: float | None = None, arrival: RemoteArrival | None = None
    ) -> torch.Tensor:
        if (empty := answer_if_empty(crops, arrival)) is not None:
            return empty
        future = self.pool._submit(self.name, crops, timeout_s, False, arrival)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self._wait_s(timeout_s))
        except TimeoutError as exc:
            raise DeadlineExceeded(f"no answer from the inference host for {self._what} within the deadline") from exc

    def submit_sync(
        self, crops: torch.Tensor, timeout_s: float | None = None, arrival: RemoteArrival | None = None,
        background: bool = False,
    ) -> torch.Tensor:
        if (empty := answer_if_empty(crops, arrival)) is not None:
            return empty
        future = self.pool._submit(self.name, crops, timeout_s, background, arrival)
        try:
            return future.result(self._wait_s(timeout_s))
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise DeadlineExceeded(f"no answer from the inference host for {self._what} within the deadline") from exc


@dataclass(frozen=True)
class RemoteServed:
    """The served pair of a model on a front-end: no versions are swapped here, so it is just the
    host's model and its batcher (:meth:`RemotePool.lease`)."""

    model: LoadedModel
    batcher: RemoteBatcher

    @property
    def version(self) -> str:
        return self.model.version


@dataclass
class _Pending:
    future: concurrent.futures.Future
    slot: int | None


class RemotePool:
    """An :class:`~ditepose.service.batching.interface.InferencePool` whose workers are the host's.

    Versions are the host's business (model repositories are refused with ``api_processes`` > 1):
    :meth:`lease` yields the served pair, :meth:`retiring` is None, the swap and request counters
    are empty (this front-end keeps none) and :attr:`default_model` is None (the settings say).

    ``on_host_lost`` runs when the pipe to the host closes (the front-end process exits: a
    front-end has nothing to serve without its host)."""

    def __init__(
        self, conn: Connection, arena: SlotArena, timeout_s: float = 30.0,
        on_host_lost: Callable[[], None] | None = None,
    ) -> None:
        self.conn = conn
        self.arena = arena
        self.timeout_s = timeout_s
        self.on_host_lost = on_host_lost
        self.models: dict[str, LoadedModel] = {}
        self.extra_models: dict[str, LoadedModel] = {}
        self.failed_models: dict[str, str] = {}
        self.devices: list[str] = []
        self.detectors: dict[str, StagedDetector] = {}
        self.batchers: dict[str, RemoteBatcher] = {}
        self.observers: list[BatchObserver] = []
        self.host_restarts = 0
        self.default_model: str | None = None
        self.swaps: dict[str, int] = {}  # kept empty: no swaps run on a front-end
        self.model_requests: dict[tuple[str, str, str], int] = {}  # kept empty: not counted here
        self.started = False
        self.stopped = False
        self._status: HostStatus | None = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------ life
    def start(self, timeout_s: float = 600.0) -> RemotePool:
        """Wait for the host's first status (models, devices), then follow it in a thread."""
        if self.started:
            return self
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"no word from the inference host within {timeout_s} s")
        message = self.conn.recv()
        if message[0] != "status":
            raise RuntimeError(f"the inference host opened with {message[0]!r}, not its status")
        self._apply_status(message[1])
        self.started = True
        self._reader = threading.Thread(target=self._read, name="ditepose-host-reader", daemon=True)
        self._reader.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.stopped:
            return
        self.stopped = True
        with contextlib.suppress(OSError):
            self.conn.close()
        self._fail_pending(BatcherClosed("the front-end is shutting down"))

    def __enter__(self) -> RemotePool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ the InferencePool surface
    @property
    def ready(self) -> bool:
        return self.started and not self.stopped and self._status is not None and self._status.ready

    def batcher(self, model: str) -> RemoteBatcher:
        return self.batchers[model]

    def model(self, name: str) -> LoadedModel:
        return self.models[name] if name in self.models else self.extra_models[name]

    @contextlib.contextmanager
    def lease(self, name: str) -> Iterator[RemoteServed]:
        """The served model ``name`` and its batcher (KeyError if none): a front-end has one version."""
        yield RemoteServed(self.models[name], self.batchers[name])

    def count_request(self, name: str, version: str, outcome: str) -> None:
        """Not counted on a front-end (see :attr:`model_requests`)."""

    def retiring(self, name: str) -> RemoteServed | None:
        """Always None: no version drains on a front-end."""
        return None

    def detector_batcher(self, name: str) -> RemoteBatcher | None:
        return self.batchers.get(detector_batcher_name(name))

    def add_detector(self, detector: StagedDetector, max_batch_size: int = 8) -> RemoteBatcher:
        """Have the host build ``detector`` (by name, from its own settings) and run it on its workers."""
        key = detector_batcher_name(detector.name)
        if key in self.batchers:
            return self.batchers[key]
        future: concurrent.futures.Future = concurrent.futures.Future()
        request_id = next(self._ids)
        with self._lock:
            self._pending[request_id] = _Pending(future, None)
        self._send(("detector", request_id, detector.name, max_batch_size))
        stats = future.result(timeout=600)
        with self._lock:
            batcher = self.batchers.get(key)
            if batcher is None:
                batcher = self.batchers[key] = RemoteBatcher(self, key, stats, detector.name)
            self.detectors[detector.name] = detector
        return batcher

    def add_model(self, model: LoadedModel, served: bool = True) -> RemoteBatcher:
        raise RuntimeError("models cannot join the pool from a front-end (api_processes > 1)")

    def remove_model(self, name: str) -> None:
        raise RuntimeError("models cannot leave the pool from a front-end (api_processes > 1)")

    def add_observer(self, observer: BatchObserver) -> None:
        if observer not in self.observers:
            self.observers.append(observer)

    def worker_status(self) -> list[WorkerStatus]:
        return list(self._status.workers) if self._status is not None else []

    def queue_depths(self) -> dict[str, int]:
        return {name: b.depth for name, b in self.batchers.items()}

    # ------------------------------------------------------------ the channel
    def _send(self, message: tuple) -> None:
        if self.stopped:
            raise BatcherClosed("the front-end is shutting down")
        try:
            with self._send_lock:
                self.conn.send(message)
        except (OSError, EOFError, ValueError) as exc:
            raise BatcherClosed(f"the inference host is gone: {exc}") from exc

    def _submit(
        self, name: str, crops: torch.Tensor, timeout_s: float | None, background: bool,
        arrival: RemoteArrival | None,
    ) -> concurrent.futures.Future:
        crops = crops.detach().contiguous()
        shape, dtype = tuple(crops.shape), crops.dtype
        slot = self.arena.acquire() if self.arena.fits(shape, dtype) else None
        payload = None
        if slot is None:
            payload = crops.numpy().tobytes()
        else:
            self.arena.write(slot, crops)
        request_id = next(self._ids)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending[request_id] = _Pending(future, slot)
        arrival_id = None
        if arrival is not None and not arrival.settled:
            arrival.settled = True  # the host settles it when it queues the crops
            arrival_id = arrival.id
        try:
            self._send(("submit", request_id, name, slot, shape, dtype_name(dtype), timeout_s, background,
                        arrival_id, payload))
        except BatcherClosed:
            self._resolve(request_id)
            raise
        return future

    def _resolve(self, request_id: int) -> _Pending | None:
        """Forget a submission and free its slot (the host has answered or will never answer)."""
        with self._lock:
            pending = self._pending.pop(request_id, None)
        if pending is not None and pending.slot is not None:
            self.arena.release(pending.slot)
        return pending

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._dispatch(message)
            except Exception:
                log.exception("front-end: a message from the host could not be handled")
        if self._status is not None:
            self._status.ready = False
        self._fail_pending(BatcherClosed("the inference host is gone"))
        if not self.stopped:
            log.error("front-end: the inference host closed the channel")
            if self.on_host_lost is not None:
                self.on_host_lost()

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "result":
            _, request_id, error, text, shape, dtype, payload, _depth = message
            with self._lock:
                pending = self._pending.pop(request_id, None)
            if pending is None:
                return
            try:
                if error is not None:
                    outcome: torch.Tensor | BatcherError = make_error(error, text)
                elif payload is not None:
                    outcome = torch.frombuffer(bytearray(payload), dtype=dtype_of(dtype)).view(*shape)
                else:
                    assert pending.slot is not None
                    outcome = self.arena.read(pending.slot, tuple(shape), dtype_of(dtype))
            finally:
                if pending.slot is not None:
                    self.arena.release(pending.slot)
            self._settle_future(pending.future, outcome)
        elif kind == "status":
            self._apply_status(message[1])
        elif kind == "detector":
            _, request_id, error, stats = message
            pending = self._resolve(request_id)
            if pending is not None:
                self._settle_future(pending.future, RuntimeError(error) if error else stats)
        else:
            log.warning("front-end: unknown message %r from the host", kind)

    @staticmethod
    def _settle_future(future: concurrent.futures.Future, outcome: object) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _apply_status(self, status: HostStatus) -> None:
        with self._lock:
            self.models = status.models
            self.failed_models = status.failed_models
            self.devices = status.devices
            self.host_restarts = status.restarts
            for name, stats in status.batchers.items():
                batcher = self.batchers.get(name)
                if batcher is not None:
                    batcher.stats = stats
                elif stats.detector is None:  # detectors join on this front-end's own add_detector
                    self.batchers[name] = RemoteBatcher(self, name, stats)
            for name in [n for n, b in self.batchers.items() if n not in status.batchers and b.detector is None]:
                del self.batchers[name]
            self._status = status
        for observation in status.batches:
            self._observe(observation)

    def _observe(self, observation: tuple[Any, ...]) -> None:
        kind, *values = observation
        if kind == "batch":
            notify_observers(self.observers, None, tuple(values))
        else:  # ("detection", detector, device, size, infer_s, queued_s, ok)
            notify_observers(self.observers, values[0], tuple(values[1:]))

    def _fail_pending(self, exc: BatcherError) -> None:
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for item in pending:
            self._settle_future(item.future, exc)
