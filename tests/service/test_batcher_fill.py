"""How a free worker fills a batch: quiet time from when it is free, announced arrivals, the fill cap."""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from service.batcher import DynamicBatcher, wait_for_batch


def _crops(n: int) -> torch.Tensor:
    return torch.ones(n, 3, 2, 2)


def test_quiet_time_counts_from_when_the_worker_is_free():
    """Crops that queued while the worker was busy do not leave at once in a partial batch."""
    batcher = DynamicBatcher("m", max_batch_size=8, max_delay_ms=100, queue_size=100)
    batcher._enqueue(_crops(1), 5)
    time.sleep(0.15)  # the worker was busy for longer than max_delay
    free = time.monotonic()
    assert wait_for_batch([batcher], 0.03, free_since=free) is None
    batcher._enqueue(_crops(2), 5)  # arrives while the worker waits: joins the batch
    batch = wait_for_batch([batcher], 1.0, free_since=free)
    assert batch is not None and batch.size == 3
    assert time.monotonic() - free >= 0.09


def test_a_free_worker_waits_for_an_announced_submission():
    batcher = DynamicBatcher("m", max_batch_size=8, max_delay_ms=5, max_fill_ms=5000, queue_size=100)
    batcher._enqueue(_crops(1), 5)
    arrival = batcher.announce()
    free = time.monotonic()
    assert wait_for_batch([batcher], 0.1, free_since=free) is None  # quiet, but a submission is on its way
    result: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: result.append(batcher.submit_sync(_crops(2), 5, arrival)))
    thread.start()
    batch = wait_for_batch([batcher], 2.0, free_since=free)
    assert batch is not None and batch.size == 3 and arrival.settled and batcher._incoming == 0
    batch.complete(torch.zeros(3, 1, 2, 2))
    thread.join(5)
    assert result[0].shape[0] == 2


def test_an_abandoned_arrival_releases_the_batch():
    batcher = DynamicBatcher("m", max_batch_size=8, max_delay_ms=20, max_fill_ms=5000, queue_size=100)
    batcher._enqueue(_crops(1), 5)
    arrival = batcher.announce()
    threading.Timer(0.05, arrival.settle).start()  # e.g. its image failed to decode
    started = time.monotonic()
    batch = wait_for_batch([batcher], 2.0, free_since=started)
    assert batch is not None and batch.size == 1
    assert 0.04 <= time.monotonic() - started < 1.0
    arrival.settle()  # idempotent
    assert batcher._incoming == 0


def test_the_fill_cap_bounds_the_wait():
    batcher = DynamicBatcher("m", max_batch_size=8, max_delay_ms=5, max_fill_ms=100, queue_size=100)
    batcher.announce()  # never arrives
    batcher._enqueue(_crops(1), 5)
    started = time.monotonic()
    batch = batcher.next_batch(2.0)
    assert batch is not None and batch.size == 1
    assert 0.09 <= time.monotonic() - started < 1.0


def test_zero_delay_never_waits_and_empty_submissions_settle():
    batcher = DynamicBatcher("m", max_batch_size=8, max_delay_ms=0, queue_size=100)
    batcher.announce()
    batcher._enqueue(_crops(1), 5)
    started = time.monotonic()
    assert batcher.next_batch(1.0).size == 1 and time.monotonic() - started < 0.05
    arrival = batcher.announce()
    assert asyncio.run(batcher.submit(_crops(0), 1, arrival)).shape[0] == 0
    assert arrival.settled
