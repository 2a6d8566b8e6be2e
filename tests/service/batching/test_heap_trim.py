"""A worker gives the C heap's free pages back once the queues drain after a busy spell."""

from __future__ import annotations

import pytest
import torch

from ditepose.service.batching.batcher import DynamicBatcher
from ditepose.service.batching.worker import HeapTrimmer, Worker, all_idle, heap_trimmer
from tests.support import wait_until


def test_a_worker_trims_the_heap_once_its_queues_drain() -> None:
    if not heap_trimmer.available:
        pytest.skip("this C library has no malloc_trim")
    batcher = DynamicBatcher("m", max_batch_size=4, max_delay_ms=1.0)
    worker = Worker("cpu/0", "cpu", {"m": lambda crops: crops.float().mean((1, 2, 3))[:, None]}, [batcher],
                    poll_s=0.02)
    before = heap_trimmer.trims
    worker.start()
    try:
        out = batcher.submit_sync(torch.ones(3, 8, 6, 3, dtype=torch.uint8), timeout_s=30)
        assert out.shape == (3, 1)
        wait_until(lambda: heap_trimmer.trims > before, timeout=30, what="a trim after the batch")
        assert all_idle([batcher])
    finally:
        worker.request_stop()
        worker.join(10)


def test_a_disabled_trimmer_trims_only_when_forced() -> None:
    trimmer = HeapTrimmer()
    trimmer.enabled = False
    assert trimmer.trim() is False and trimmer.trims == 0
    assert trimmer.trim(force=True) is trimmer.available
    assert trimmer.trims == (1 if trimmer.available else 0)
