"""DITEPOSE_WORKER_PROCESSES: each CPU worker runs its network in its own child process."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from ditepose.model import build_model
from ditepose.model.engines.torch_engine import InferenceEngine
from ditepose.service.batching.loaded_model import LoadedModel
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.settings import Settings


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.manual_seed(0)
    module = build_model("dite_hrnet_18").eval()
    return LoadedModel("m", "dite_hrnet_18", "coco", 17, (64, 64), module, None, True, 0.0)


def test_each_worker_has_its_own_engine_process_and_a_killed_one_comes_back(loaded):
    crops = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = InferenceEngine(loaded.module)(crops)
    pool = WorkerPool([loaded], ["cpu"], workers_per_device=2, torch_threads=1, worker_processes=True).start()
    try:
        engines = [worker.infers["m"] for worker in pool.workers]
        pids = {engine.pid for engine in engines}
        assert len(pids) == 2 and os.getpid() not in pids
        got = pool.batcher("m").submit_sync(crops, timeout_s=60)
        assert (got - expected).abs().max().item() < 1e-5
        os.kill(engines[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 10  # dead before the next batch (a kill racing a batch fails it)
        while engines[0].alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(4):  # whichever worker takes them, every request is answered
            got = pool.batcher("m").submit_sync(crops, timeout_s=60)
            assert (got - expected).abs().max().item() < 1e-5
        assert engines[1].alive() and engines[1].restarts == 0 and pool.ready
        # the killed worker's engine restarts on its next batch (if no request reached it yet, now)
        assert (engines[0](crops) - expected).abs().max().item() < 1e-5
        assert engines[0].alive() and engines[0].restarts == 1
    finally:
        pool.stop()
    assert not any(engine.alive() for engine in engines)


def test_setting_reaches_the_pool(monkeypatch):
    monkeypatch.setenv("DITEPOSE_WORKER_PROCESSES", "true")
    assert Settings(_env_file=None).worker_processes is True
