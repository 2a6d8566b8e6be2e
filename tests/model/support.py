"""Helpers of the model tests: the authors' reference models and the batch-independence check."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

GOLDEN_18 = "dite_hrnet_18_coco_golden_io.pt"
# architecture -> (reference checkpoint, golden input/output file, joints) in ../shared/fixtures/reference
REFERENCE_CASES = {
    "dite_hrnet_18": ("dite_hrnet_18_coco_random.pth", GOLDEN_18, 17),
    "dite_hrnet_30": ("dite_hrnet_30_mpii_random.pth", "dite_hrnet_30_mpii_golden_io.pt", 16),
}


def load_reference(reference_dir: Path, arch: str) -> tuple[nn.Module, dict]:
    """``arch`` with its reference checkpoint (eval mode) and its golden inputs and float64 outputs."""
    from ditepose.model import build_model, load_checkpoint

    ckpt, io_file, joints = REFERENCE_CASES[arch]
    model = build_model(arch, num_joints=joints)
    load_checkpoint(model, reference_dir / ckpt)
    return model.eval(), torch.load(reference_dir / io_file, weights_only=True)


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


# one refusal an engine must make: (what it is given, the error it raises, a pattern of the message or None)
Refusal = tuple[object, type[Exception], str | None]


def assert_refuses(call: Callable[[Any], object], refusals: Sequence[Refusal]) -> None:
    """``call(given)`` raises each refusal's error with its message: the engines' shared contract for bad input."""
    for given, error, match in refusals:
        with pytest.raises(error, match=match):
            call(given)
