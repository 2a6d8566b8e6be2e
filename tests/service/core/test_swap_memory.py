"""Memory after swaps: ten swaps leave the process (and the GPU, where present) where one swap left it.

Each swap loads a real Dite-HRNet-18 checkpoint from disk, builds and checks its engines on
every device beside the old one, serves crops on it, and frees the old version after its last
batch. Were an old version kept (a reference left in a worker, the pipeline cache, a batcher), RSS
would grow by at least one version's weights per swap, nine times over; the bound allows two.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ditepose import model as models
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.model_loader import check_engine, load_model
from ditepose.service.core.settings import ModelSpec

MIB = 1024 * 1024


def _rss_bytes() -> int:
    """Resident set size of this process, from /proc (what the kernel charges it)."""
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    module = models.build_model("dite_hrnet_18", num_joints=17).eval()
    meta = models.CheckpointMeta(arch="dite_hrnet_18", dataset="coco", num_joints=17, input_size=(64, 64))
    return models.save_checkpoint(path, module, meta)


def _device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS is read from /proc (Linux)")
def test_rss_and_gpu_memory_after_ten_swaps_stay_within_two_versions_of_after_one(tmp_path: Path) -> None:
    files = [_checkpoint(tmp_path / f"v{i}.pth", seed=i) for i in (1, 2)]
    first = load_model(ModelSpec(name="m", checkpoint=files[0]), version="1")
    version_bytes = sum(p.numel() * p.element_size() for p in first.module.parameters())
    version_bytes += sum(b.numel() * b.element_size() for b in first.module.buffers())
    device = _device()
    crops = torch.randn(8, 3, 64, 64)
    with WorkerPool([first], [device], max_delay_ms=1, timeout_s=30) as pool:
        del first
        rss: dict[int, int] = {}
        gpu: dict[int, int] = {}
        for swap in range(1, 11):
            path = files[swap % 2]
            pool.swap_model(load_model(ModelSpec(name="m", checkpoint=path), version=str(swap + 1)),
                            check=check_engine)
            for _ in range(3):  # traffic on the new version
                assert torch.isfinite(pool.batcher("m").submit_sync(crops, timeout_s=30)).all()
            assert pool.wait_drained("m", 30), "the old version was not freed"
            assert pool.resident_versions("m") == [str(swap + 1)]
            rss[swap] = _rss_bytes()
            if device.startswith("cuda"):
                gpu[swap] = torch.cuda.memory_allocated(0)
    growth = rss[10] - rss[1]
    bound = 2 * version_bytes
    print(f"\nRSS after 1 swap {rss[1] / MIB:.1f} MiB, after 10 {rss[10] / MIB:.1f} MiB (growth "
          f"{growth / MIB:+.1f} MiB, bound {bound / MIB:.1f} MiB = 2 versions of {version_bytes / MIB:.1f} MiB)"
          + (f"; GPU allocated {gpu[1] / MIB:.1f} -> {gpu[10] / MIB:.1f} MiB" if gpu else ""))
    assert growth <= bound, f"RSS grew {growth / MIB:.1f} MiB over nine swaps (bound {bound / MIB:.1f} MiB)"
    if gpu:
        assert gpu[10] - gpu[1] <= version_bytes, f"GPU memory grew {(gpu[10] - gpu[1]) / MIB:.1f} MiB"
