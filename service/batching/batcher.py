"""Dynamic batching of crops across concurrent requests (Triton-style).

A request submits a tensor of P crops. The batcher splits it into chunks of at most
``max_batch_size`` and queues them. Workers pull batches: a batch is released when it is
full, or once a free worker has seen the queue stay quiet for ``max_delay_ms`` (no new crop
arrived and none is announced, see :meth:`DynamicBatcher.announce`), and at the latest
``max_fill_ms`` after the worker became free (or after the oldest chunk arrived, if later).
Quietness is counted from the moment the worker is free, not from the arrival of the oldest
chunk: under saturation the crops that queued while the previous batch ran would otherwise
leave at once in a half batch, and the service settles into alternating half batches (the
network is slower per crop at batch 16 than at 32). With several workers (e.g. one
single-threaded worker per CPU core) the crops are shared instead: a free worker goes as soon
as its fair share of the crops in the system (queued, announced, running) is queued while
others run, and free workers split a large backlog between them. The queue is bounded (in crops):
a submission that does not fit raises :class:`Overloaded` at once instead of queueing, and
every submission has a deadline, so a caller never waits forever even if no worker runs.

Background submissions (evaluation jobs in embedded mode, ``background=True``) share the
workers and the batches with live requests but yield to them: a batch takes the live crops
first and fills what room is left with background ones (queued in quarter-batch pieces, so
they fit beside live crops), background crops never count against the live queue bound (they
are never shed: a job waits its turn), and a batch of only background crops leaves after
``max_delay_ms`` of quiet like any other.

Batchers (one per model) share one ``threading.Condition``: a worker waits on all at once (:func:`wait_for_batch`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ditepose.service.batching.assembly import assemble_batch, concat_outputs

if TYPE_CHECKING:
    from ditepose.service.batching.interface import Announcement

SPLIT_MIN = 4  # crops per worker below which a backlog is not split among free workers


class BatcherError(RuntimeError):
    """Base class of the errors a submission can end with."""


class Overloaded(BatcherError):
    """The queue is full; the caller should retry later (HTTP 429)."""


class DeadlineExceeded(BatcherError):
    """The submission was not answered before its deadline (HTTP 504)."""


class BatcherClosed(BatcherError):
    """The batcher was closed (service shutting down)."""


class InferenceFailed(BatcherError):
    """The worker's forward pass raised; only the requests of that batch get this."""


class OutOfMemory(InferenceFailed):
    """The device ran out of memory for this batch: its requests are shed (HTTP 503 with
    Retry-After, gRPC RESOURCE_EXHAUSTED), the device's cached blocks are released, and the worker
    serves the next batch. Transient by nature (the memory a larger batch, another model or another
    process held), so clients may retry; a subclass, so code that handles InferenceFailed still does."""


class Arrival:
    """A submission on its way (its image is being decoded and cropped): see :meth:`DynamicBatcher.announce`."""

    def __init__(self, batcher: DynamicBatcher) -> None:
        self.batcher = batcher
        self.settled = False

    def settle(self) -> None:
        """The submission arrived or was abandoned (idempotent); wakes workers waiting for it."""
        with self.batcher.condition:
            if not self.settled:
                self.settled = True
                self.batcher._incoming -= 1
                self.batcher.condition.notify_all()


@dataclass(eq=False)
class _Item:
    crops: torch.Tensor
    deadline: float
    enqueued: float
    background: bool = False
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def size(self) -> int:
        return int(self.crops.shape[0])


@dataclass(eq=False)
class Batch:
    """Crops of one or more submissions that run through the network together."""

    batcher: DynamicBatcher
    items: list[_Item]
    queued_s: float  # how long the oldest item waited
    _done: bool = field(default=False, repr=False)

    @property
    def size(self) -> int:
        return sum(item.size for item in self.items)

    @property
    def background_size(self) -> int:
        """Crops of background submissions (evaluation jobs) in this batch."""
        return sum(item.size for item in self.items if item.background)

    def tensor(self) -> torch.Tensor:
        """The network input of the batch (see :func:`assemble_batch`)."""
        return assemble_batch([item.crops for item in self.items])

    def complete(self, heatmaps: torch.Tensor) -> None:
        """Hand each submission its slice of the output."""
        if heatmaps.shape[0] != self.size:
            self.fail(InferenceFailed(f"model returned {heatmaps.shape[0]} outputs for {self.size} crops"))
            return
        start = 0
        for item in self.items:
            _set_result(item.future, heatmaps[start : start + item.size])
            start += item.size
        self._finished()

    def fail(self, exc: BaseException) -> None:
        for item in self.items:
            _set_exception(item.future, exc)
        self._finished()

    def _finished(self) -> None:
        """No longer running: free workers re-evaluate their fair share (see ``_due_in``)."""
        with self.batcher.condition:
            if not self._done:
                self._done = True
                self.batcher._running -= self.size
                self.batcher._running_batches -= 1
                self.batcher.condition.notify_all()


def _set_result(future: concurrent.futures.Future, value: object) -> None:
    if not future.done():
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            future.set_result(value)


def _retrieve_exception(future: asyncio.Future) -> None:
    """Mark an abandoned future's exception as seen, so asyncio does not log it as lost."""
    if not future.cancelled():
        future.exception()


def _set_exception(future: concurrent.futures.Future, exc: BaseException) -> None:
    if not future.done():
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            future.set_exception(exc)


class DynamicBatcher:
    """Bounded queue of crops for one model, drained in batches by worker threads."""

    def __init__(
        self, name: str, max_batch_size: int = 32, max_delay_ms: float = 5.0, queue_size: int = 512,
        default_timeout_s: float = 30.0, condition: threading.Condition | None = None,
        max_fill_ms: float | None = None, detector: str | None = None, key: str | None = None,
        version: str | None = None,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1:
            raise ValueError("max_batch_size and queue_size must be >= 1")
        self.name = name
        # Workers find the engine of a batch by ``key``: two versions of one model (the one
        # served and the one draining after a swap) share ``name`` but never ``key``.
        self.key = key or name
        self.version = version  # the model version whose engines run this batcher's batches
        self.detector = detector  # a person detector's name when this batcher queues detector inputs
        self._what = f"detector {detector!r}" if detector else f"model {name!r}"  # for error messages
        self._unit = "images" if detector else "crops"
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        # The most a free worker waits to fill a batch (default 10x max_delay_ms).
        self.max_fill_s = (10.0 * max_delay_ms if max_fill_ms is None else max_fill_ms) / 1000.0
        self.queue_size = queue_size
        self.default_timeout_s = default_timeout_s
        self.condition = condition or threading.Condition()
        self._items: deque[_Item] = deque()
        self._pending = 0  # live crops queued, not yet taken by a worker
        self._background: deque[_Item] = deque()
        self._background_pending = 0  # background crops queued (not bounded by queue_size)
        self._incoming = 0  # announced submissions not yet queued (see announce)
        self._last_arrival = 0.0
        self._running = 0  # crops in batches that workers run now
        self._running_batches = 0
        self._free_workers = 0  # workers waiting in wait_for_batch on this batcher
        self._closed = False
        self._closed_why = ""  # said to submissions after close (e.g. the version was swapped out)
        self.rejected = 0
        self.expired = 0

    # ---------------------------------------------------------------- callers
    @property
    def depth(self) -> int:
        """Live crops waiting in the queue."""
        return self._pending

    @property
    def idle(self) -> bool:
        """Nothing queued, announced or running (a retired version may be freed once this holds; lock held)."""
        return not (self._pending or self._background_pending or self._incoming or self._running)

    @property
    def background_depth(self) -> int:
        """Background crops (evaluation jobs) waiting in the queue."""
        return self._background_pending

    def check_admission(self) -> None:
        """Raise :class:`Overloaded` (and count the rejection) when the live queue is already full.

        Front-ends call it before decoding a request, so a 429 does not wait behind work that
        cannot be served; :meth:`submit` has the final say, by the real crop count."""
        with self.condition:
            if self._pending >= self.queue_size:
                self.rejected += 1
                raise Overloaded(f"queue of {self._what} is full ({self._pending} {self._unit} waiting)")

    def announce(self) -> Arrival:
        """Tell the workers a submission is on its way (decoding, cropping): while one is, a free
        worker keeps filling its batch (up to ``max_fill_ms``) instead of running it after
        ``max_delay_ms`` of quiet. Pass the token to :meth:`submit`/:meth:`submit_sync`, and
        :meth:`Arrival.settle` it if the submission is abandoned."""
        with self.condition:
            self._incoming += 1
        return Arrival(self)

    def _enqueue(
        self, crops: torch.Tensor, timeout_s: float | None, arrival: Arrival | None = None, background: bool = False
    ) -> list[_Item]:
        if crops.ndim != 4:
            raise ValueError(f"crops must be [P,C,H,W] (or uint8 [P,H,W,3]), got shape {tuple(crops.shape)}")
        count = int(crops.shape[0])
        now = time.monotonic()
        deadline = now + (self.default_timeout_s if timeout_s is None else timeout_s)
        # Background work goes in small pieces, so it can fill whatever room live crops leave.
        piece = max(1, self.max_batch_size // 4) if background else self.max_batch_size
        items = [_Item(crops[i : i + piece], deadline, now, background) for i in range(0, count, piece)]
        with self.condition:
            if self._closed:
                raise BatcherClosed(f"batcher {self.name!r} is closed{self._closed_why}")
            if background:
                self._background.extend(items)
                self._background_pending += count
            else:
                # An empty queue always admits one submission, so a request larger than the
                # queue is still served when the service is idle.
                if self._pending and self._pending + count > self.queue_size:
                    self.rejected += 1
                    raise Overloaded(f"queue of {self._what} is full ({self._pending} {self._unit} waiting)")
                self._items.extend(items)
                self._pending += count
            self._last_arrival = now
            if arrival is not None and not arrival.settled:
                arrival.settled = True
                self._incoming -= 1
            self.condition.notify_all()
        return items

    def _cancel(self, items: Sequence[_Item]) -> None:
        """The caller gave up: free the queue slots of whatever no worker has taken yet."""
        with self.condition:
            for item in items:
                if item.future.cancel():
                    queue = self._background if item.background else self._items
                    try:
                        queue.remove(item)
                    except ValueError:
                        continue
                    self._dequeued(item)

    def _dequeued(self, item: _Item) -> None:
        """Bookkeeping for an item that left its queue (lock held)."""
        if item.background:
            self._background_pending -= item.size
        else:
            self._pending -= item.size

    def submit_sync(
        self, crops: torch.Tensor, timeout_s: float | None = None, arrival: Arrival | None = None,
        background: bool = False,
    ) -> torch.Tensor:
        """Queue ``crops`` and block until their outputs arrive (for threads: evaluation jobs, tests).

        ``background``: yield to live requests (see the module docstring)."""
        if (empty := answer_if_empty(crops, arrival)) is not None:
            return empty
        items = self._enqueue(crops, timeout_s, arrival, background)
        outputs = []
        try:
            for item in items:
                remaining = item.deadline - time.monotonic()
                try:
                    outputs.append(item.future.result(timeout=max(remaining, 0.0)))
                except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError) as exc:
                    raise DeadlineExceeded(f"no answer from {self._what} within the deadline") from exc
        except BaseException:
            self._cancel(items)
            raise
        return concat_outputs(outputs)

    async def submit(
        self, crops: torch.Tensor, timeout_s: float | None = None, arrival: Arrival | None = None
    ) -> torch.Tensor:
        """Queue ``crops`` and await their outputs without blocking the event loop."""
        if (empty := answer_if_empty(crops, arrival)) is not None:
            return empty
        items = self._enqueue(crops, timeout_s, arrival)
        waiters = [asyncio.wrap_future(item.future) for item in items]
        remaining = items[0].deadline - time.monotonic()
        gathered = asyncio.gather(*waiters)
        try:
            outputs = await asyncio.wait_for(gathered, timeout=max(remaining, 0.0))
        except TimeoutError as exc:
            self._cancel(items)
            gathered.add_done_callback(_retrieve_exception)
            raise DeadlineExceeded(f"no answer from {self._what} within the deadline") from exc
        except BaseException:
            self._cancel(items)
            gathered.add_done_callback(_retrieve_exception)
            raise
        return concat_outputs(outputs)

    def close(self, reason: str | None = None) -> None:
        """Refuse new submissions and fail the queued ones; ``reason`` is added to their errors."""
        with self.condition:
            self._closed = True
            if reason:
                self._closed_why = f": {reason}"
            items = [*self._items, *self._background]
            self._items.clear()
            self._background.clear()
            self._pending = self._background_pending = 0
            self.condition.notify_all()
        for item in items:
            _set_exception(item.future, BatcherClosed(f"batcher {self.name!r} closed{self._closed_why}"))

    # ---------------------------------------------------------------- workers
    def _drop_dead_head(self, now: float) -> None:
        """Drop cancelled or expired items at the heads of the queues (lock held)."""
        for queue in (self._items, self._background):
            while queue:
                head = queue[0]
                if head.future.cancelled():
                    pass
                elif head.deadline <= now:
                    self.expired += 1
                    _set_exception(head.future, DeadlineExceeded(f"request expired in the queue of {self.name!r}"))
                else:
                    break
                queue.popleft()
                self._dequeued(head)

    def _due_in(self, now: float, free_since: float) -> float | None:
        """Seconds until a batch is due for a worker free since ``free_since``; 0 = now; None = queue
        empty (lock held)."""
        self._drop_dead_head(now)
        if not self._items and not self._background:
            return None
        queued = self._pending + self._background_pending
        if queued >= self.max_batch_size:
            return 0.0
        if self._running:
            # Other workers are busy: once this worker's fair share of the crops in the system
            # is queued, go (two workers at c/2 each beat one at c and an idle one).
            workers = self._free_workers + self._running_batches
            share = -(-(queued + self._incoming + self._running) // max(workers, 1))
            if queued >= min(share, self.max_batch_size):
                return 0.0
        oldest = min(q[0].enqueued for q in (self._items, self._background) if q)
        due = max(oldest, free_since) + self.max_fill_s
        if not self._incoming:  # nothing on its way: wait only for max_delay of quiet
            due = min(due, max(self._last_arrival, free_since) + self.max_delay_s)
        return max(0.0, due - now)

    def _take(self, now: float) -> Batch | None:
        """Pop up to ``max_batch_size`` crops (lock held); None if every item was cancelled.

        With several workers free, a large backlog is shared: this worker takes its part
        (at least ``SPLIT_MIN`` crops each) and leaves the rest to the others."""
        limit = self.max_batch_size
        queued = self._pending + self._background_pending
        if self._free_workers > 1 and queued >= SPLIT_MIN * self._free_workers:
            limit = min(limit, -(-queued // self._free_workers))
        taken: list[_Item] = []
        total = 0
        oldest = min((q[0].enqueued for q in (self._items, self._background) if q), default=now)
        for queue in (self._items, self._background):  # live crops first; background ones fill the rest
            while queue and (not taken or total + queue[0].size <= limit) and \
                    total + queue[0].size <= self.max_batch_size:
                item = queue.popleft()
                self._dequeued(item)
                if item.deadline <= now and not item.future.cancelled():
                    self.expired += 1
                    _set_exception(item.future, DeadlineExceeded(f"request expired in the queue of {self.name!r}"))
                    continue
                if not item.future.set_running_or_notify_cancel():
                    continue  # the caller gave up
                taken.append(item)
                total += item.size
        if not taken:
            return None
        self._running += total
        self._running_batches += 1
        return Batch(self, taken, now - oldest)

    def next_batch(self, timeout_s: float) -> Batch | None:
        """Wait up to ``timeout_s`` for a batch of this batcher alone."""
        return wait_for_batch([self], timeout_s)


def answer_if_empty(crops: torch.Tensor, arrival: Announcement | None) -> torch.Tensor | None:
    """No crops need no batch: every submit (here and on a host's front-end) answers them at once."""
    if crops.shape[0] != 0:
        return None
    if arrival is not None:
        arrival.settle()
    return crops.new_zeros((0,))


_rotation = itertools.count()


def wait_for_batch(
    batchers: Sequence[DynamicBatcher], timeout_s: float, free_since: float | None = None
) -> Batch | None:
    """Wait until one of ``batchers`` (sharing one condition) has a due batch and take it.

    ``free_since``: when the calling worker finished its last batch (default: now). Returns
    None after ``timeout_s`` with nothing due, so worker loops can check for stop. Batchers are
    scanned from a rotating start so one busy model cannot starve another.
    """
    if not batchers:
        time.sleep(timeout_s)
        return None
    condition = batchers[0].condition
    if any(b.condition is not condition for b in batchers):
        raise ValueError("batchers waited on together must share one condition")
    give_up = time.monotonic() + timeout_s
    free_since = give_up - timeout_s if free_since is None else free_since
    start = next(_rotation) % len(batchers)
    order = list(batchers[start:]) + list(batchers[:start])
    with condition:
        for batcher in batchers:
            batcher._free_workers += 1
        try:
            return _wait_locked(order, condition, give_up, free_since)
        finally:
            for batcher in batchers:
                batcher._free_workers -= 1


def _wait_locked(
    order: Sequence[DynamicBatcher], condition: threading.Condition, give_up: float, free_since: float
) -> Batch | None:
    """The waiting loop of :func:`wait_for_batch` (condition held)."""
    while True:
        now = time.monotonic()
        wait = give_up - now
        if wait <= 0:
            return None
        for batcher in order:
            due = batcher._due_in(now, free_since)
            if due is None:
                continue
            if due <= 0:
                batch = batcher._take(now)
                if batch is not None:
                    return batch
                due = batcher._due_in(now, free_since)
                if due is None:
                    continue
            wait = min(wait, max(due, 1e-4))
        condition.wait(wait)
