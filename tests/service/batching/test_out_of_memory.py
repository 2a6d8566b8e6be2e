"""A device out of memory sheds that batch's requests (503 / RESOURCE_EXHAUSTED) and the pool recovers.

On a CPU host the fault is injected (a fake, said here): the workers' forward pass raises
``torch.OutOfMemoryError``, the exception CUDA's caching allocator raises, for the batches a test
chooses. No CPU allocation fails that way on demand. The ``cuda`` test at the end makes a real
one: it caps the process's share of the GPU so that a large batch cannot fit, then lifts the cap.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch

from ditepose.proto.ditepose.v1 import pose_pb2
from ditepose.service.batching.batcher import InferenceFailed, OutOfMemory
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.batching.worker import is_out_of_memory
from ditepose.service.core.errors import from_batcher_error
from ditepose.service.core.model_loader import load_model
from ditepose.service.core.settings import ModelSpec
from ditepose.service.grpc.convert import ERROR_CODE_METADATA
from tests.reliability.support import serve
from tests.service.conftest import assert_error, encode, figure_image, post_pose
from tests.service.grpc.support import channel, make_settings, running_services, stub, tiny_checkpoint

BOX = [[40, 10, 80, 100]]


class OutOfMemoryFault:
    """Test-only: the next ``count`` forward passes raise CUDA's out-of-memory error."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def arm(self, count: int = 1) -> None:
        with self.lock:
            self.count = count

    def wrap(self, infer):
        def run(batch: torch.Tensor) -> torch.Tensor:
            with self.lock:
                fire, self.count = self.count > 0, max(0, self.count - 1)
            if fire:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
            return infer(batch)
        return run


def test_out_of_memory_is_recognised_whatever_its_form() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried ... out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator's error type
    error = from_batcher_error(OutOfMemory("out of memory on cuda:0"), retry_after_s=3)
    assert (error.code, error.status, error.headers) == ("out_of_memory", 503, {"Retry-After": "3"})
    assert isinstance(OutOfMemory("x"), InferenceFailed)  # code that handles InferenceFailed still does


def test_pool_sheds_the_batch_and_serves_the_next(tmp_path: Path) -> None:
    fault = OutOfMemoryFault()
    model = load_model(ModelSpec(name="m", checkpoint=tiny_checkpoint(tmp_path / "tiny.pth")))
    crops = torch.randn(4, 3, 64, 64)
    pool = WorkerPool([model], ["cpu"], max_delay_ms=1, timeout_s=30,
                      infer_factory=lambda m, device: fault.wrap(lambda x: torch.ones(x.shape[0], 17, 16, 16)))
    with pool:
        fault.arm()
        with pytest.raises(OutOfMemory, match="out of memory on cpu for a batch of 4 crops"):
            pool.batcher("m").submit_sync(crops, timeout_s=30)
        assert pool.batcher("m").submit_sync(crops, timeout_s=30).shape == (4, 17, 16, 16)
        status = pool.worker_status()[0]
        assert status.alive and status.out_of_memory == 1 and status.errors == 1 and status.batches == 2


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """Pool + REST (uvicorn) + gRPC on one PoseService, with the out-of-memory fault in its forward pass."""
    fault = OutOfMemoryFault()
    settings = make_settings(tiny_checkpoint(tmp_path_factory.mktemp("oom") / "tiny.pth"), retry_after_s=2)
    with running_services(settings, wrap_infer=fault.wrap) as (_pool, app, grpc_server), serve(app) as url, \
            channel(grpc_server) as ch:
        yield url, ch, fault


def test_rest_answers_503_out_of_memory_then_200(live: tuple) -> None:
    url, _ch, fault = live
    image = encode(figure_image(160, 120))
    with httpx.Client(base_url=url, timeout=30) as client:
        before = _shed(client.get("/metrics").text)
        fault.arm()
        response = post_pose(client, image, boxes=BOX)
        assert_error(response, 503, "out_of_memory")
        assert response.headers["retry-after"] == "2"
        assert post_pose(client, image, boxes=BOX).status_code == 200
        assert _shed(client.get("/metrics").text) == before + 1


def _shed(metrics: str) -> float:
    """ditepose_worker_out_of_memory_total of the CPU worker, from a /metrics page."""
    found = re.findall(r'^ditepose_worker_out_of_memory_total\{device="cpu",worker="cpu/0"\} (\S+)$', metrics, re.M)
    assert len(found) == 1, [line for line in metrics.splitlines() if "out_of_memory" in line]
    return float(found[0])


def test_grpc_answers_resource_exhausted_then_ok(live: tuple) -> None:
    _url, ch, fault = live
    request = pose_pb2.EstimateRequest(image=encode(figure_image(160, 120)),
                                       boxes=[pose_pb2.Box(x=40, y=10, width=80, height=100)])
    fault.arm()
    with pytest.raises(grpc.RpcError) as failed:
        stub(ch).Estimate(request, timeout=30)
    err = failed.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "out of memory" in err.details()
    trailing = dict(err.trailing_metadata() or ())
    assert trailing[ERROR_CODE_METADATA] == "out_of_memory" and trailing["retry-after"] == "2"
    assert len(stub(ch).Estimate(request, timeout=30).persons) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a real out-of-memory)")
def test_real_cuda_out_of_memory_sheds_the_batch_and_the_pool_recovers(tmp_path: Path) -> None:
    model = load_model(ModelSpec(name="m", checkpoint=tiny_checkpoint(tmp_path / "big.pth", size=(192, 256))))
    big = torch.randn(256, 3, 256, 192)
    with WorkerPool([model], ["cuda:0"], max_batch_size=256, max_delay_ms=1, timeout_s=60) as pool:
        batcher = pool.batcher("m")
        assert batcher.submit_sync(big[:2], timeout_s=60).shape[0] == 2  # warm: weights and kernels resident
        total = torch.cuda.get_device_properties(0).total_memory
        # room for what is allocated now plus 32 MiB: a batch of 256 at 256x192 needs far more
        cap = (torch.cuda.memory_allocated(0) + 32 * 2**20) / total
        torch.cuda.set_per_process_memory_fraction(cap, 0)
        try:
            torch.cuda.empty_cache()
            with pytest.raises(OutOfMemory, match="out of memory on cuda:0 for a batch of 256 crops"):
                batcher.submit_sync(big, timeout_s=60)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, 0)
        assert torch.isfinite(batcher.submit_sync(big, timeout_s=60)).all()
        assert pool.worker_status()[0].out_of_memory == 1 and pool.worker_status()[0].alive
