"""ProcessEngine: the optimised engine in a child process, equal results, and a dead child is an
error for the batch in flight and replaced for the next one (no fakes: real spawned processes)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from ditepose.model import build_model, load_checkpoint
from ditepose.model.engines.process_engine import EngineProcessDied, ProcessEngine
from ditepose.model.engines.torch_engine import InferenceEngine


@pytest.fixture(scope="module")
def network(reference_dir):
    model = build_model("dite_hrnet_18")
    load_checkpoint(model, reference_dir / "dite_hrnet_18_coco_random.pth")
    return model.eval()


@pytest.fixture(scope="module")
def engine(network):
    proc = ProcessEngine(network, threads=1)
    yield proc
    proc.close()


def test_same_heatmaps_as_the_in_process_engine(network, engine):
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = InferenceEngine(network)(x)
    # fp32 sums in another order when the thread counts differ: relative to the heatmaps' scale
    # (random weights give values in the thousands, so an absolute 1e-5 only held by luck)
    assert (engine(x) - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())
    info = engine.describe()
    assert info["process"] is True and info["pid"] != os.getpid() and info["torch_threads"] == 1
    assert info["channels_last"] is True and info["optimized_module"] is True


def test_a_bad_batch_fails_the_call_and_the_child_keeps_serving(engine):
    pid = engine.pid
    with pytest.raises(RuntimeError, match="3 channels"):
        engine(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="NCHW"):
        engine(torch.randn(3, 64, 64))
    assert engine(torch.randn(1, 3, 64, 64)).shape == (1, 17, 16, 16)
    assert engine.pid == pid and engine.restarts == 0


def test_a_killed_child_fails_the_batch_in_flight_and_is_replaced(engine):
    before = engine.restarts
    outcome: dict[str, BaseException | torch.Tensor] = {}

    def run() -> None:
        try:
            outcome["result"] = engine(torch.randn(24, 3, 256, 192))
        except BaseException as exc:  # recorded for the assertion
            outcome["result"] = exc

    caller = threading.Thread(target=run)
    caller.start()
    time.sleep(0.3)  # the child is in the middle of a ~1 s batch
    os.kill(engine.pid, signal.SIGKILL)
    caller.join(60)
    assert isinstance(outcome["result"], EngineProcessDied), outcome["result"]
    assert "died" in str(outcome["result"])
    assert engine(torch.randn(2, 3, 64, 64)).shape == (2, 17, 16, 16)  # a fresh child
    assert engine.restarts == before + 1 and engine.alive()


def test_close_ends_the_child(network):
    proc = ProcessEngine(network, threads=1)
    child = proc._process
    proc.close()
    assert child is not None and not child.is_alive()
