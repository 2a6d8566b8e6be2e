"""Parameter and multiply-accumulate counts, as the paper reports them."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, input_size_wh: tuple[int, int]) -> int:
    """Multiply-accumulates of one forward pass on a single image (convolutions and matmuls)."""
    width, height = input_size_wh
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(torch.zeros(1, 3, height, width))
    finally:
        module.train(was_training)
    return int(counter.get_total_flops()) // 2
