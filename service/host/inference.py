"""The inference host of ``ditepose serve --api-processes N``: one process owning the pool.

It loads the models once onto every device (:class:`~ditepose.service.batching.pool.WorkerPool`),
starts N front-end processes (:func:`ditepose.service.host.frontend.run_frontend`) and serves
their submissions: crops arrive in a front-end's shared-memory slot, go into the pool's real
batcher (so REST and gRPC crops of all front-ends meet in one batch, and the queue bound is the
host's), and the heatmaps go back into the same slot. Every front-end has a reader thread (its
messages) and a sender thread (its replies, statuses and batch observations: a front-end that
stops reading only stalls its own sender, never a worker or another front-end).

A front-end that dies is restarted (same index, fresh pipe and slots); what it had announced is
settled and its in-flight count given back. The front-ends die with the host: each sets
``PR_SET_PDEATHSIG`` and also exits when its pipe to the host closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch

from ditepose.model.detectors import StagedDetector
from ditepose.service.batching.batcher import Arrival, BatcherError, DynamicBatcher
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.pose_service import PoseService
from ditepose.service.core.settings import Settings
from ditepose.service.host.admission import SharedCounts
from ditepose.service.host.remote import (
    STATUS_PERIOD_S,
    BatcherStats,
    HostStatus,
    describe_model,
    error_kind,
)
from ditepose.service.host.slots import SlotArena, dtype_name, dtype_of

log = logging.getLogger(__name__)

SLOTS_PER_FRONT_END = 32
MIN_SLOT_BYTES = 4 << 20  # a NanoDet input (3x416x416 float32 = 2 MB) fits
CROPS_PER_SLOT = 4  # two persons with the flip test, of the largest served model
RESTART_BACKOFF_S = 1.0


def slot_bytes_for(pool: WorkerPool) -> int:
    largest = max((3 * m.input_size[0] * m.input_size[1] * 4 for m in pool.models.values()), default=0)
    return max(MIN_SLOT_BYTES, CROPS_PER_SLOT * largest)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) ``host:port`` with SO_REUSEPORT: resolves port 0 once for all
    front-ends and fails early on a port someone else holds. Connections only go to the
    front-ends' listening sockets."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def _one_torch_thread() -> None:
    torch.set_num_threads(1)


@dataclass(eq=False)
class FrontEnd:
    """One front-end process as the host sees it (one incarnation: a restart is a new FrontEnd)."""

    index: int
    generation: int
    process: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    arena: SlotArena
    started: float
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    arrivals: dict[int, Arrival] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, message: tuple) -> None:
        if not self.closed:
            self.outbox.put(message)


class InferenceHost:
    """The pool, the shared admission counts and N supervised front-end processes."""

    def __init__(
        self, settings: Settings, pool: WorkerPool, service: PoseService, processes: int | None = None,
    ) -> None:
        """``service``: the composition root's pose service over ``pool``; it builds the detectors
        front-ends ask for, from this process's settings, into the pool."""
        self.settings = settings
        self.pool = pool
        self.service = service
        self.processes = processes or settings.api_processes
        self.context = multiprocessing.get_context("spawn")
        self.counts = SharedCounts.create(self.processes, self.context)
        self.slot_bytes = slot_bytes_for(pool)
        self.front_ends: list[FrontEnd | None] = [None] * self.processes
        self.restarts = 0
        self.stopping = threading.Event()
        self._generation = 0
        self._observations: list[tuple[Any, ...]] = []
        self._observations_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="ditepose-host-loop", daemon=True)
        self._status_thread = threading.Thread(target=self._publish_status, name="ditepose-host-status", daemon=True)
        self._reserved = [reserve_port(settings.host, settings.port)]
        self.rest_port = self._reserved[0].getsockname()[1]
        self.grpc_port: int | None = None
        if settings.grpc_enabled:
            self._reserved.append(reserve_port(settings.host, settings.grpc_port))
            self.grpc_port = self._reserved[1].getsockname()[1]
        pool.add_observer(self)

    # ------------------------------------------------------------ observer (worker threads)
    def observe_batch(
        self, model: str, device: str, size: int, infer_s: float, queued_s: float, ok: bool, background: int = 0
    ) -> None:
        with self._observations_lock:
            self._observations.append(("batch", model, device, size, infer_s, queued_s, ok, background))

    def observe_detection(self, detector: str, device: str, size: int, infer_s: float, queued_s: float,
                          ok: bool) -> None:
        with self._observations_lock:
            self._observations.append(("detection", detector, device, size, infer_s, queued_s, ok))

    # ------------------------------------------------------------ life
    def start(self, ready_timeout_s: float = 600.0) -> InferenceHost:
        """Start the front-ends and wait until each serves (its REST and gRPC ports are bound)."""
        self._loop_thread.start()
        # The loop thread only copies tensors in and out of slots: one thread, no OpenMP pool
        # spinning beside the workers (torch's thread count is per calling thread).
        asyncio.run_coroutine_threadsafe(_one_torch_thread(), self._loop).result(30)
        for index in range(self.processes):
            self.front_ends[index] = self._spawn(index)
        self._status_thread.start()
        deadline = time.monotonic() + ready_timeout_s
        for front_end in list(self.front_ends):
            assert front_end is not None
            while not front_end.ready.wait(0.2):
                if self.stopping.is_set():
                    return self
                if not front_end.process.is_alive():
                    raise RuntimeError(f"front-end {front_end.index} exited with {front_end.process.exitcode} "
                                       "before serving (see its log above)")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"front-end {front_end.index} did not serve within {ready_timeout_s} s")
        return self

    def _spawn(self, index: int) -> FrontEnd:
        from ditepose.service.host.frontend import run_frontend

        self._generation += 1
        arena = SlotArena.create(SLOTS_PER_FRONT_END, self.slot_bytes)
        host_end, child_end = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=run_frontend,
            name=f"ditepose-api-{index}",
            args=(index, child_end, arena.name, arena.slots, arena.slot_bytes, self.counts, self.settings,
                  multiprocessing.current_process().pid, self.rest_port, self.grpc_port),
            daemon=True,
        )
        process.start()
        child_end.close()
        front_end = FrontEnd(index, self._generation, process, host_end, arena, time.monotonic())
        front_end.send(("status", self.status()))
        threading.Thread(target=self._send_loop, args=(front_end,), name=f"ditepose-host-send-{index}",
                         daemon=True).start()
        threading.Thread(target=self._read_loop, args=(front_end,), name=f"ditepose-host-read-{index}",
                         daemon=True).start()
        log.info("front-end %d started (pid %s)", index, process.pid)
        return front_end

    def supervise(self, period_s: float = 0.2) -> None:
        """Restart front-ends that died, until :meth:`request_stop` (blocks; the main thread's loop)."""
        while not self.stopping.wait(period_s):
            for index, front_end in enumerate(self.front_ends):
                if front_end is None or front_end.process.is_alive() or self.stopping.is_set():
                    continue
                self._forget(front_end)
                wait = front_end.started + RESTART_BACKOFF_S - time.monotonic()
                if wait > 0:
                    continue  # a crash loop restarts at most once a second
                self.restarts += 1
                log.error("front-end %d (pid %s) exited with %s; restarting it", index, front_end.process.pid,
                          front_end.process.exitcode)
                self.front_ends[index] = self._spawn(index)

    def request_stop(self) -> None:
        self.stopping.set()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the front-ends (SIGTERM, then SIGKILL after ``grace_s``); the caller stops the pool."""
        self.stopping.set()
        front_ends = [f for f in self.front_ends if f is not None]
        for front_end in front_ends:
            if front_end.process.is_alive():
                front_end.process.terminate()
        deadline = time.monotonic() + grace_s
        for front_end in front_ends:
            front_end.process.join(max(0.0, deadline - time.monotonic()))
            if front_end.process.is_alive():
                front_end.process.kill()
                front_end.process.join(2.0)
            self._forget(front_end)
        self._loop.call_soon_threadsafe(self._loop.stop)
        for sock in self._reserved:
            sock.close()

    # ------------------------------------------------------------ state for the front-ends
    def status(self) -> HostStatus:
        pool = self.pool
        batchers = {
            name: BatcherStats(b.detector, b.depth, b.background_depth, b.rejected, b.expired, b.queue_size,
                               b.max_batch_size)
            for name, b in list(pool.batchers.items())
        }
        return HostStatus(
            ready=pool.ready, workers=pool.worker_status(), batchers=batchers,
            models={n: describe_model(m) for n, m in list(pool.models.items())},
            failed_models=dict(pool.failed_models), devices=list(pool.devices), restarts=self.restarts,
        )

    def _publish_status(self) -> None:
        while not self.stopping.wait(STATUS_PERIOD_S):
            with self._observations_lock:
                observations, self._observations = self._observations, []
            status = self.status()
            status.batches = observations
            for front_end in list(self.front_ends):
                if front_end is not None:
                    front_end.send(("status", status))

    # ------------------------------------------------------------ one front-end's channel
    def _send_loop(self, front_end: FrontEnd) -> None:
        while True:
            message = front_end.outbox.get()
            if message is None:
                return
            try:
                front_end.conn.send(message)
            except (OSError, ValueError):
                return

    def _read_loop(self, front_end: FrontEnd) -> None:
        conn = front_end.conn
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._handle(front_end, message)
            except Exception:
                log.exception("host: a message of front-end %d could not be handled", front_end.index)
        self._forget(front_end)

    def _handle(self, front_end: FrontEnd, message: tuple) -> None:
        kind = message[0]
        if kind == "submit":
            asyncio.run_coroutine_threadsafe(self._submit(front_end, message), self._loop)
        elif kind == "announce":
            _, arrival_id, name = message
            batcher = self.pool.batchers.get(name)
            if batcher is not None:
                front_end.arrivals[arrival_id] = batcher.announce()
        elif kind == "settle":
            arrival = front_end.arrivals.pop(message[1], None)
            if arrival is not None:
                arrival.settle()
        elif kind == "detector":
            threading.Thread(target=self._add_detector, args=(front_end, message), daemon=True).start()
        elif kind == "ready":
            front_end.ready.set()
            log.info("front-end %d (pid %s) serves", front_end.index, front_end.process.pid)
        else:
            log.warning("host: unknown message %r from front-end %d", kind, front_end.index)

    def _add_detector(self, front_end: FrontEnd, message: tuple) -> None:
        _, request_id, name, _max_batch = message
        try:
            detector = self.service.detector(name)
            batcher = self.pool.detector_batcher(detector.name) if isinstance(detector, StagedDetector) else None
            if batcher is None:
                raise RuntimeError(f"detector {name!r} does not run on the pool")
            stats = BatcherStats(batcher.detector, batcher.depth, batcher.background_depth, batcher.rejected,
                                 batcher.expired, batcher.queue_size, batcher.max_batch_size)
            front_end.send(("detector", request_id, None, stats))
        except Exception as exc:
            front_end.send(("detector", request_id, f"{type(exc).__name__}: {exc}", None))

    async def _submit(self, front_end: FrontEnd, message: tuple) -> None:
        _, request_id, name, slot, shape, dtype, timeout_s, background, arrival_id, payload = message
        arrival = front_end.arrivals.pop(arrival_id, None) if arrival_id is not None else None
        batcher: DynamicBatcher | None = self.pool.batchers.get(name)
        try:
            if batcher is None:
                raise KeyError(f"the pool has no batcher {name!r}")
            kind = dtype_of(dtype)
            if slot is not None:
                crops = front_end.arena.view(slot, tuple(shape), kind)
            else:
                crops = torch.frombuffer(bytearray(payload), dtype=kind).view(*shape)
            if background:
                out = await asyncio.to_thread(batcher.submit_sync, crops, timeout_s, arrival, True)
            else:
                out = await batcher.submit(crops, timeout_s, arrival)
        except Exception as exc:
            text = str(exc) if isinstance(exc, BatcherError) else f"{type(exc).__name__}: {exc}"
            front_end.send(("result", request_id, error_kind(exc), text, None, None, None,
                            batcher.depth if batcher is not None else 0))
            return
        finally:
            if arrival is not None:
                arrival.settle()
        out = out.detach().cpu().contiguous()
        shape_out, dtype_out = tuple(out.shape), out.dtype
        reply_payload = None
        if slot is not None and front_end.arena.fits(shape_out, dtype_out) and not front_end.closed:
            front_end.arena.write(slot, out)
        else:
            reply_payload = out.numpy().tobytes()
        front_end.send(("result", request_id, None, "", shape_out, dtype_name(dtype_out), reply_payload,
                        batcher.depth))

    def _forget(self, front_end: FrontEnd) -> None:
        """A front-end is gone: settle what it announced, give back its in-flight count, free its slots."""
        with front_end.lock:
            if front_end.closed:
                return
            front_end.closed = True
        front_end.outbox.put(None)
        for arrival in list(front_end.arrivals.values()):
            arrival.settle()
        front_end.arrivals.clear()
        held = self.counts.forget(front_end.index)
        if held:
            log.warning("front-end %d left %d requests in flight; their admission slots are free again",
                        front_end.index, held)
        with contextlib.suppress(OSError):
            front_end.conn.close()
        front_end.arena.close()
