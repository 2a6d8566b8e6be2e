"""How a free worker fills a batch: quiet time from when it is free, announced arrivals, the fill cap."""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from ditepose.service.batching.batcher import DynamicBatcher, wait_for_batch


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


def _free_worker(batcher: DynamicBatcher, out: list, free: float, wait_s: float = 2.0) -> threading.Thread:
    thread = threading.Thread(target=lambda: out.append(wait_for_batch([batcher], wait_s, free_since=free)))
    thread.start()
    return thread


def test_free_workers_share_a_large_backlog_and_keep_small_batches_whole():
    batcher = DynamicBatcher("m", max_batch_size=32, max_delay_ms=20, queue_size=100)
    got: list = []
    threads = [_free_worker(batcher, got, time.monotonic()) for _ in range(2)]
    while batcher._free_workers < 2:
        time.sleep(0.001)
    for _ in range(32):  # 32 one-person requests, both workers free: 16 each, run at once
        batcher._enqueue(_crops(1), 5)
    for thread in threads:
        thread.join(5)
    assert sorted(b.size for b in got) == [16, 16]
    for batch in got:
        batch.complete(torch.zeros(batch.size, 1, 2, 2))
    got.clear()
    batcher._enqueue(_crops(1), 5)
    batcher._enqueue(_crops(1), 5)  # too small to split: one batch of 2
    threads = [_free_worker(batcher, got, time.monotonic(), 0.3) for _ in range(2)]
    for thread in threads:
        thread.join(5)
    assert [b.size for b in got if b is not None] == [2]


def test_a_free_worker_goes_with_its_fair_share_while_another_runs():
    batcher = DynamicBatcher("m", max_batch_size=32, max_delay_ms=5, max_fill_ms=5000, queue_size=100)
    batcher._enqueue(_crops(8), 5)
    running = batcher.next_batch(1.0)  # another worker runs 8 crops
    assert running.size == 8
    batcher._enqueue(_crops(4), 5)
    arrivals = [batcher.announce() for _ in range(4)]  # share = (4 queued + 4 coming + 8 running) / 2 = 8
    started = time.monotonic()
    assert wait_for_batch([batcher], 0.1, free_since=started) is None
    for arrival in arrivals:
        batcher._enqueue(_crops(1), 5, arrival)  # 8 queued: the share is here, go at once
    batch = wait_for_batch([batcher], 1.0)
    assert batch is not None and batch.size == 8 and time.monotonic() - started < 1.0
    running.complete(torch.zeros(8, 1, 2, 2))
    assert batcher._running == 8 and batcher._running_batches == 1
    batch.fail(RuntimeError("x"))
    batch.fail(RuntimeError("again"))  # counted once
    assert batcher._running == 0 and batcher._running_batches == 0
