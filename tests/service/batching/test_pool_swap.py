"""WorkerPool.swap_model: versions side by side, the atomic switch, draining and freeing the old one."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch
from torch import nn

from ditepose.service.batching.batcher import BatcherClosed
from ditepose.service.batching.infer import make_infer
from ditepose.service.batching.loaded_model import LoadedModel
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.batching.versions import SwapRefused
from ditepose.service.core.model_loader import check_engine


class _Times(nn.Module):
    """A real network whose output is ``factor`` times the input's first channel: it tells versions apart."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 17, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0] = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _version(factor: float, version: str) -> LoadedModel:
    model = LoadedModel("m", "tiny", "coco", 17, (4, 4), _Times(factor).eval(), None, True, 0.0)
    return replace(model, version=version)


def _crops(value: float, count: int = 1) -> torch.Tensor:
    return torch.full((count, 3, 4, 4), value)


class _Gate:
    """Wraps a real engine; the test opens the gate to let its batches run (so items can queue on purpose)."""

    def __init__(self, infer) -> None:
        self.infer = infer
        self.open = threading.Event()
        self.closed_engine = False

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        assert self.open.wait(30), "the test never opened the gate"
        return self.infer(crops)

    def close(self) -> None:
        self.closed_engine = True


def _pool(gates: dict[str, _Gate]) -> WorkerPool:
    def factory(model: LoadedModel, device: str):
        gate = gates[model.version] = _Gate(make_infer(model.module, device, "fp32"))
        return gate

    # two workers: one may sit in a gated batch of the old version while the other runs the new one
    return WorkerPool([_version(1.0, "1")], ["cpu"], max_delay_ms=1, timeout_s=30, infer_factory=factory,
                      workers_per_device=2)


def test_queued_batches_finish_on_the_old_version_and_new_ones_go_to_the_new():
    gates: dict[str, _Gate] = {}
    with _pool(gates) as pool:
        out: dict[str, torch.Tensor] = {}
        with pool.lease("m") as old:
            assert old.version == "1"
            submitted = threading.Thread(target=lambda: out.setdefault("old", old.batcher.submit_sync(_crops(3.0))))
            submitted.start()
            entry = pool.swap_model(_version(2.0, "2"))
            gates["2"].open.set()
            assert pool.served("m") is entry and pool.models["m"].version == "2"
            assert pool.resident_versions("m") == ["2", "1"]  # the old one is still held and queued
            new_out = pool.batcher("m").submit_sync(_crops(3.0), timeout_s=10)
            assert float(new_out[0, 0, 0, 0]) == 6.0  # the new version's weights
            gates["1"].open.set()
            submitted.join(10)
        assert float(out["old"][0, 0, 0, 0]) == 3.0  # queued before the swap: ran on version 1
        assert pool.wait_drained("m", 10)
        assert pool.resident_versions("m") == ["2"]
        assert gates["1"].closed_engine and not gates["2"].closed_engine
        assert pool.swaps == {"m": 1}
        with pytest.raises(BatcherClosed, match="version 1 of model 'm' was replaced by version 2"):
            old.batcher.submit_sync(_crops(1.0))  # e.g. an evaluation job that kept the old batcher
        assert all("m" not in w.infers or w.infers["m"] is not gates["1"] for w in pool.workers)


def test_a_version_that_fails_its_check_changes_nothing():
    gates: dict[str, _Gate] = {}
    with _pool(gates) as pool:
        for gate in gates.values():
            gate.open.set()
        bad = _version(float("nan"), "2")

        def check(model: LoadedModel, infer, device: str) -> None:
            infer.open.set()
            check_engine(model, infer, device)

        with pytest.raises(ValueError, match="not finite"):
            pool.swap_model(bad, check=check)
        assert pool.models["m"].version == "1" and pool.resident_versions("m") == ["1"]
        assert gates["2"].closed_engine  # the rejected version's engine was closed at once
        out = pool.batcher("m").submit_sync(_crops(1.0), timeout_s=10)
        assert float(out[0, 0, 0, 0]) == 1.0
        assert pool.swaps == {}


def test_at_most_two_versions_resident_a_third_swap_waits_for_the_drain():
    gates: dict[str, _Gate] = {}
    with _pool(gates) as pool:
        for gate in gates.values():
            gate.open.set()
        held = pool.lease("m")
        held.__enter__()  # a request still holds version 1
        pool.swap_model(_version(2.0, "2"))
        gates["2"].open.set()
        with pytest.raises(SwapRefused, match="still draining"):
            pool.swap_model(_version(3.0, "3"), drain_timeout_s=0.2)
        assert pool.resident_versions("m") == ["2", "1"]
        assert "3" not in gates  # refused before any engine of version 3 was built

        done = threading.Event()

        def third() -> None:
            pool.swap_model(_version(3.0, "3"), drain_timeout_s=30)
            done.set()

        swapper = threading.Thread(target=third)
        swapper.start()
        time.sleep(0.3)
        assert not done.is_set()  # waiting for version 1 to be released
        held.__exit__(None, None, None)
        swapper.join(20)
        assert done.is_set()
        gates["3"].open.set()
        assert pool.models["m"].version == "3"
        assert len(pool.resident_versions("m")) <= 2
        assert pool.wait_drained("m", 10) and pool.resident_versions("m") == ["3"]
        assert gates["1"].closed_engine and gates["2"].closed_engine


def test_swap_adds_a_new_name_and_remove_model_frees_both_versions():
    gates: dict[str, _Gate] = {}
    with _pool(gates) as pool:
        for gate in gates.values():
            gate.open.set()
        other = replace(_version(5.0, "7"), name="other")
        pool.swap_model(other)
        gates["7"].open.set()
        assert pool.models["other"].version == "7"
        out = pool.batcher("other").submit_sync(_crops(1.0), timeout_s=10)
        assert float(out[0, 0, 0, 0]) == 5.0
        pool.remove_model("other")
        assert "other" not in pool.models and gates["7"].closed_engine
