"""The GPU memory gauges the dashboard plots: exported always, filled for CUDA devices."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.metrics import (
    GpuMemory,
    GpuMemoryGauges,
    PoolCollector,
    ServiceMetrics,
    cuda_memory,
    gpu_memory_families,
    start_gpu_memory_sampler,
)
from ditepose.service.core.model_loader import LoadedModel

GPU_FAMILIES = {f"ditepose_gpu_memory_{n}_bytes" for n in ("allocated", "reserved", "peak_allocated", "total")}


def _pool(devices: list[str]) -> WorkerPool:
    loaded = LoadedModel("m", "dite_hrnet_18", "coco", 17, (192, 256), torch.nn.Identity(), None, True, 0.0)
    return WorkerPool([loaded], devices)


def _scrape(metrics: ServiceMetrics) -> dict[str, list]:
    text = generate_latest(metrics.registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_cpu_pool_exports_the_families_without_samples():
    metrics = ServiceMetrics(CollectorRegistry())
    metrics.watch_pool(_pool(["cpu"]))
    families = _scrape(metrics)
    assert set(families) >= GPU_FAMILIES
    assert all(families[name] == [] for name in GPU_FAMILIES)
    assert cuda_memory("cpu") is None


def test_cuda_devices_get_one_sample_per_device_and_gauge():
    seen: list[str] = []

    def fake(device: str) -> GpuMemory | None:
        seen.append(device)
        if device == "cpu":
            return None
        index = int(device.split(":")[1])
        return GpuMemory(100 + index, 200 + index, 300 + index, 1000)

    metrics = ServiceMetrics(CollectorRegistry())
    pool = _pool(["cuda:0", "cuda:1", "cpu"])

    metrics.registry.register(PoolCollector(pool, memory_fn=fake))
    families = _scrape(metrics)
    values = {(s.name, s.labels["device"]): s.value for name in GPU_FAMILIES for s in families[name]}
    assert values == {
        ("ditepose_gpu_memory_allocated_bytes", "cuda:0"): 100, ("ditepose_gpu_memory_allocated_bytes", "cuda:1"): 101,
        ("ditepose_gpu_memory_reserved_bytes", "cuda:0"): 200, ("ditepose_gpu_memory_reserved_bytes", "cuda:1"): 201,
        ("ditepose_gpu_memory_peak_allocated_bytes", "cuda:0"): 300,
        ("ditepose_gpu_memory_peak_allocated_bytes", "cuda:1"): 301,
        ("ditepose_gpu_memory_total_bytes", "cuda:0"): 1000, ("ditepose_gpu_memory_total_bytes", "cuda:1"): 1000,
    }
    assert seen == ["cuda:0", "cuda:1", "cpu"]


def test_duplicate_devices_are_reported_once():
    families = gpu_memory_families(["cuda:0", "cuda:0"], lambda d: GpuMemory(1, 2, 3, 4))
    assert [len(f.samples) for f in families] == [1, 1, 1, 1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_memory_follows_allocations():
    torch.cuda.init()
    before = cuda_memory("cuda:0")
    assert before is not None
    block = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda:0")
    after = cuda_memory("cuda:0")
    assert after is not None and after.allocated >= before.allocated + block.numel()
    assert after.reserved >= after.allocated and after.total > after.reserved
    del block


def test_worker_gauges_take_the_same_names_and_update_from_the_memory_reader():
    registry = CollectorRegistry()
    gauges = GpuMemoryGauges(registry, memory_fn=lambda d: GpuMemory(5, 6, 7, 8) if d.startswith("cuda") else None)
    gauges.update([])  # a CPU-only worker: nothing to report
    families = {f.name: f.samples for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert set(families) == GPU_FAMILIES and all(not s for s in families.values())
    gauges.update(["cuda:0", "cpu"])
    families = {f.name: f.samples for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert {name: [(s.labels, s.value) for s in samples] for name, samples in families.items()} == {
        "ditepose_gpu_memory_allocated_bytes": [({"device": "cuda:0"}, 5.0)],
        "ditepose_gpu_memory_reserved_bytes": [({"device": "cuda:0"}, 6.0)],
        "ditepose_gpu_memory_peak_allocated_bytes": [({"device": "cuda:0"}, 7.0)],
        "ditepose_gpu_memory_total_bytes": [({"device": "cuda:0"}, 8.0)],
    }


def test_sampler_thread_keeps_updating():
    calls: list[list[str] | None] = []

    class Recording(GpuMemoryGauges):
        def update(self, devices: list[str] | None = None) -> None:
            calls.append(devices)
            if len(calls) == 1:
                raise RuntimeError("a failing read must not stop the sampler")

    stop = threading.Event()
    thread = start_gpu_memory_sampler(0.01, Recording(CollectorRegistry()), stop)
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread.is_alive() and len(calls) >= 3
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
