"""DynamicBatcher and WorkerPool as plain classes (what gRPC and the job workers reuse)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from ditepose.service.batching.batcher import (
    BatcherClosed,
    DeadlineExceeded,
    DynamicBatcher,
    InferenceFailed,
    Overloaded,
    wait_for_batch,
)
from ditepose.service.batching.loaded_model import LoadedModel
from ditepose.service.batching.pool import WorkerPool


class _Scale(nn.Module):
    """A tiny real network: output = 2 * the first channel (exact in fp32); fails on 4 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _loaded(name: str = "tiny") -> LoadedModel:
    return LoadedModel(name, "tiny", "coco", 17, (4, 4), _Scale().eval(), None, True, 0.0)


def _crops(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()


def test_split_and_gather_across_submissions():
    batcher = DynamicBatcher("m", max_batch_size=4, max_delay_ms=50, queue_size=100)
    results = {}

    def submit(key: int, values: list[float]) -> None:
        results[key] = batcher.submit_sync(_crops(values), timeout_s=5)

    threads = [threading.Thread(target=submit, args=(0, [1, 2, 3, 4, 5, 6])), threading.Thread(target=submit, args=(1, [7]))]
    deadline = time.monotonic() + 10
    for thread, depth in zip(threads, (6, 7), strict=True):  # first the 6 crops, then the 1
        thread.start()
        while batcher.depth < depth and time.monotonic() < deadline:
            time.sleep(0.005)
    sizes = []
    while any(t.is_alive() for t in threads):
        batch = batcher.next_batch(0.2)
        if batch is not None:
            sizes.append(batch.size)
            batch.complete(batch.tensor()[:, :1] * 10)
    assert sorted(sizes, reverse=True) == [4, 3]  # 6 split into 4 + 2; the 2 joined by the 1 from the other caller
    assert results[0][:, 0, 0, 0].tolist() == [10, 20, 30, 40, 50, 60]
    assert results[1][:, 0, 0, 0].tolist() == [70]


def test_waits_max_delay_for_a_partial_batch():
    batcher = DynamicBatcher("m", max_batch_size=8, max_delay_ms=100, queue_size=100)
    batcher._enqueue(_crops([1]), 5)
    started = time.monotonic()
    assert batcher.next_batch(0.02) is None  # not due yet
    batch = batcher.next_batch(1.0)
    assert batch is not None and batch.size == 1
    assert time.monotonic() - started >= 0.09


def test_full_batch_is_released_at_once():
    batcher = DynamicBatcher("m", max_batch_size=2, max_delay_ms=10_000, queue_size=100)
    batcher._enqueue(_crops([1, 2]), 5)
    started = time.monotonic()
    assert batcher.next_batch(1.0).size == 2
    assert time.monotonic() - started < 0.5


def test_overloaded_is_immediate_and_deadline_never_blocks_forever():
    batcher = DynamicBatcher("m", max_batch_size=2, max_delay_ms=1, queue_size=3)
    batcher._enqueue(_crops([1, 2]), 30)  # nobody drains this queue
    started = time.monotonic()
    with pytest.raises(Overloaded):
        batcher.submit_sync(_crops([3, 4]), timeout_s=30)
    assert time.monotonic() - started < 0.1
    assert batcher.rejected == 1
    with pytest.raises(DeadlineExceeded):
        batcher.submit_sync(_crops([5]), timeout_s=0.1)
    with pytest.raises(DeadlineExceeded):
        asyncio.run(batcher.submit(_crops([5]), timeout_s=0.1))
    assert time.monotonic() - started < 2


def test_empty_queue_admits_a_request_larger_than_the_queue():
    batcher = DynamicBatcher("m", max_batch_size=2, max_delay_ms=1, queue_size=1)
    items = batcher._enqueue(_crops([1, 2, 3]), 5)
    assert len(items) == 2 and batcher.depth == 3


def test_expired_and_cancelled_items_are_skipped():
    batcher = DynamicBatcher("m", max_batch_size=4, max_delay_ms=0, queue_size=100)
    (stale,) = batcher._enqueue(_crops([1]), 0.0)
    (gone,) = batcher._enqueue(_crops([2]), 5)
    gone.future.cancel()
    (live,) = batcher._enqueue(_crops([3]), 5)
    batch = batcher.next_batch(0.5)
    assert [i.crops[0, 0, 0, 0].item() for i in batch.items] == [3]
    assert isinstance(stale.future.exception(), DeadlineExceeded) and batcher.expired == 1
    assert batcher.depth == 0 and live.future.running()


def test_close_fails_queued_and_refuses_new():
    batcher = DynamicBatcher("m", queue_size=100)
    (item,) = batcher._enqueue(_crops([1]), 5)
    batcher.close()
    assert isinstance(item.future.exception(), BatcherClosed)
    with pytest.raises(BatcherClosed):
        batcher.submit_sync(_crops([1]))


def test_wait_for_batch_serves_several_batchers_on_one_condition():
    cond = threading.Condition()
    a = DynamicBatcher("a", max_delay_ms=0, condition=cond)
    b = DynamicBatcher("b", max_delay_ms=0, condition=cond)
    b._enqueue(_crops([1]), 5)
    assert wait_for_batch([a, b], 0.5).batcher is b
    with pytest.raises(ValueError):
        wait_for_batch([a, DynamicBatcher("c")], 0.01)


def test_pool_async_and_sync_callers_and_a_failing_batch():
    with WorkerPool([_loaded()], ["cpu"], max_batch_size=8, max_delay_ms=2) as pool:
        assert pool.ready
        batcher = pool.batcher("tiny")
        out = batcher.submit_sync(_crops([1, 2, 3]), timeout_s=5)
        assert out[:, 0, 0, 0].tolist() == [2, 4, 6]

        async def many() -> list[torch.Tensor]:
            return await asyncio.gather(*(batcher.submit(_crops([i]), 5) for i in range(10)))

        outs = asyncio.run(many())
        assert [o[0, 0, 0, 0].item() for o in outs] == [2.0 * i for i in range(10)]

        bad = torch.zeros(1, 4, 2, 2)  # the conv raises on 4 channels
        with pytest.raises(InferenceFailed):
            batcher.submit_sync(bad, timeout_s=5)
        # The worker survives and serves the next request.
        assert batcher.submit_sync(_crops([5]), timeout_s=5)[0, 0, 0, 0].item() == 10
        (status,) = pool.worker_status()
        assert status.alive and status.errors == 1 and "RuntimeError" in status.last_error
    assert not pool.ready and pool.worker_status()[0].state == "stopped"


def test_pool_with_several_workers_and_models_under_threads():
    models = [_loaded("a"), _loaded("b")]
    with WorkerPool(models, ["cpu"], workers_per_device=2, max_batch_size=4, max_delay_ms=1) as pool:
        assert len(pool.workers) == 2

        def call(i: int) -> float:
            name = "ab"[i % 2]
            return pool.batcher(name).submit_sync(_crops([i]), timeout_s=5)[0, 0, 0, 0].item()

        with ThreadPoolExecutor(8) as ex:
            assert list(ex.map(call, range(40))) == [2.0 * i for i in range(40)]
        assert sum(w.crops for w in pool.worker_status()) == 40


def test_stop_fails_waiting_requests_quickly():
    pool = WorkerPool([_loaded()], ["cpu"], max_batch_size=4, max_delay_ms=1)  # never started
    batcher = pool.batcher("tiny")
    result: list[BaseException] = []

    def wait() -> None:
        try:
            batcher.submit_sync(_crops([1]), timeout_s=30)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.05)
    pool.stop()
    thread.join(2)
    assert not thread.is_alive() and isinstance(result[0], BatcherClosed)


def test_torch_threads_is_set_on_the_worker_thread():
    seen: list[int] = []

    def factory(loaded: LoadedModel, device: str):
        def infer(batch: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return loaded.module(batch)

        return infer

    with WorkerPool([_loaded()], ["cpu"], infer_factory=factory, torch_threads=1, max_delay_ms=0) as pool:
        pool.batcher("tiny").submit_sync(_crops([1]), timeout_s=5)
    assert seen == [1]
