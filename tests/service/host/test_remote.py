"""What crosses the pipe keeps its meaning: batcher errors by class, refusals by message."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

from ditepose.service.batching import batcher
from ditepose.service.batching.interface import InferencePool
from ditepose.service.batching.loaded_model import LoadedModel
from ditepose.service.core.errors import from_batcher_error
from ditepose.service.core.settings import Settings
from ditepose.service.host.remote import (
    BatcherStats,
    HostStatus,
    RemotePool,
    describe_model,
    error_kind,
    make_error,
)
from ditepose.service.host.slots import SlotArena
from ditepose.service.server import refuse_for_processes


@pytest.mark.parametrize(("error", "code"), [
    (batcher.Overloaded("full"), "overloaded"), (batcher.DeadlineExceeded("late"), "timeout"),
    (batcher.InferenceFailed("boom"), "inference_failed"), (batcher.BatcherClosed("closed"), "unavailable"),
    (batcher.OutOfMemory("oom"), "out_of_memory"),  # a subclass of InferenceFailed: the table keeps it apart
])
def test_a_host_error_is_the_same_error_on_the_front_end(error: batcher.BatcherError, code: str) -> None:
    again = make_error(error_kind(error), str(error))
    assert type(again) is type(error) and str(again) == str(error)
    assert from_batcher_error(again).code == code


def test_an_unexpected_host_error_is_an_internal_error() -> None:
    again = make_error(error_kind(KeyError("x")), "KeyError: 'x'")
    assert type(again) is batcher.BatcherError
    assert from_batcher_error(again).code == "internal"


def test_a_model_repository_is_refused_with_several_processes_and_nothing_else_is() -> None:
    assert refuse_for_processes(Settings(_env_file=None)) is None
    why = refuse_for_processes(SimpleNamespace(model_repository=Path("/srv/models")))  # type: ignore[arg-type]
    assert why is not None and "api_processes=1" in why and "/srv/models" in why


def test_a_remote_pool_answers_the_pool_interface_with_its_one_version() -> None:
    """What RemotePool says where it has no versions (see batching.interface): the lease is the
    served pair, nothing drains, and the counters it does not keep are empty."""
    model = LoadedModel(name="m", arch="dite_hrnet_18", dataset="coco", num_joints=17, input_size=(192, 256),
                        module=nn.Identity(), checkpoint=None, demo_weights=True, load_s=0.0, version="7")
    status = HostStatus(ready=True, workers=[], batchers={"m": BatcherStats(None, 0, 0, 0, 0, 8, 4)},
                        models={"m": describe_model(model)}, failed_models={}, devices=["cpu"])
    host_end, front_end = multiprocessing.Pipe(duplex=True)
    arena = SlotArena.create(1, 1 << 16)
    host_end.send(("status", status))
    pool: InferencePool = RemotePool(front_end, arena).start(timeout_s=10)
    try:
        with pool.lease("m") as served:
            assert served.model.version == "7" and served.batcher is pool.batcher("m")
        with pytest.raises(KeyError), pool.lease("unknown"):
            pass
        pool.count_request("m", "7", "ok")
        assert pool.retiring("m") is None and dict(pool.swaps) == {} and dict(pool.model_requests) == {}
        assert pool.default_model is None and pool.ready
    finally:
        pool.stop()
        host_end.close()
        arena.close()
