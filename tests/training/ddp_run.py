"""Run one Trainer under torchrun and keep each process's own weights and BatchNorm buffers.

``python -m torch.distributed.run --nproc_per_node 2 tests/training/ddp_run.py CONFIG_JSON DATA WORK``
writes WORK/rank{R}.pt (the model state of process R) beside the usual checkpoints and logs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ditepose.training.config import TrainConfig
from ditepose.training.trainer import Trainer, cleanup_distributed


def main(config_json: str, data: str, work: str) -> None:
    cfg = TrainConfig.from_dict(json.loads(config_json))
    try:
        trainer = Trainer(cfg, data, work, device="cpu", progress=False)
        trainer.fit()
        torch.save(trainer.model.state_dict(), Path(work) / f"rank{trainer.rank}.pt")
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
