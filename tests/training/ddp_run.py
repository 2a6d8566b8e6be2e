"""Run one Trainer under torchrun and keep each process's own weights, BatchNorm buffers and batches.

``python -m torch.distributed.run --nproc_per_node 2 tests/training/ddp_run.py CONFIG_JSON DATA WORK``
writes WORK/rank{R}.pt (the model state of process R) and WORK/seen_rank{R}.json (what process R
trained on: the dataset indices of every micro-batch per epoch, and the learning rate its
optimizer held at every step) beside the usual checkpoints and logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ditepose.training.config import TrainConfig
from ditepose.training.trainer import Trainer, cleanup_distributed


class RecordingTrainer(Trainer):
    """The real Trainer; it also notes the indices its loader delivered and the lr each step used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[int, list[list[int]]] = {}  # epoch (1-based) -> this process's micro-batches
        self.step_lrs: list[float] = []  # the optimizer's lr at every step, in order

    def _loader(self) -> Iterator[dict[str, torch.Tensor]]:
        micro = self.seen.setdefault(self.epoch + 1, [])
        for batch in super()._loader():
            micro.append(batch["index"].tolist())
            yield batch

    def _step(self, micro: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        loss = super()._step(micro)
        self.step_lrs.append(float(self.optimizer.param_groups[0]["lr"]))
        return loss

    def record(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size,
                "seen": {str(e): b for e, b in self.seen.items()}, "lrs": self.step_lrs}


def launch(cfg: TrainConfig, data: Path, work: Path, port: int, nproc: int = 2) -> None:
    """Run this script under ``torch.distributed.run`` (gloo on CPU, 1 thread per process); fail with its stderr."""
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_port", str(port), str(Path(__file__).resolve()), json.dumps(cfg.to_dict()),
                        str(data), str(work)], cwd=repo, env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]


def main(config_json: str, data: str, work: str) -> None:
    cfg = TrainConfig.from_dict(json.loads(config_json))
    try:
        trainer = RecordingTrainer(cfg, data, work, device="cpu", progress=False)
        trainer.fit()
        torch.save(trainer.model.state_dict(), Path(work) / f"rank{trainer.rank}.pt")
        (Path(work) / f"seen_rank{trainer.rank}.json").write_text(json.dumps(trainer.record()))
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
