"""Helpers of the model tests: the batch-independence check shared by the reference and optimised networks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

GOLDEN_18 = "dite_hrnet_18_coco_golden_io.pt"


def mirrored_golden_batch(reference_dir: Path) -> torch.Tensor:
    """Dite-HRNet-18's calibrated reference inputs (float64; they keep the random-weight network
    well conditioned) plus the first one mirrored: a batch of 3 distinct samples."""
    golden = torch.load(reference_dir / GOLDEN_18, weights_only=True)["input"].double()
    return torch.cat([golden, golden[:1].flip(-1)])


def batch_leak(net: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> float:
    """Largest |difference| between ``net`` on the whole batch and on each sample alone.

    Zero up to rounding when no sample influences another's output.
    """
    with torch.inference_mode():
        together = net(batch)
        alone = torch.cat([net(batch[i : i + 1]) for i in range(len(batch))])
    return (together - alone).abs().max().item()
