"""Heatmap regression loss of the paper (mmpose 0.16 ``JointsMSELoss``, use_target_weight=True).

mmpose 0.x has no 0.5 factor (that was the original HRNet code): loss = mean over joints of
MSE(pred * w, target * w). A constant factor would not change Adam's steps anyway.
"""

from __future__ import annotations

import torch
from torch import nn


class JointsMSELoss(nn.Module):
    """Mean over joints of MSE(pred * w, target * w); ``loss_weight`` scales the result."""

    def __init__(self, use_target_weight: bool = True, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.use_target_weight = use_target_weight
        self.loss_weight = loss_weight

    def forward(self, output: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor | None) -> torch.Tensor:
        if output.shape != target.shape:
            raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ")
        n, k = output.shape[:2]
        pred = output.reshape(n, k, -1).float()
        gt = target.reshape(n, k, -1).float()
        if self.use_target_weight:
            if target_weight is None:
                raise ValueError("use_target_weight=True needs target_weight [N, K, 1]")
            w = target_weight.reshape(n, k, 1).float()
            pred, gt = pred * w, gt * w
        per_joint = ((pred - gt) ** 2).mean(dim=(0, 2))  # nn.MSELoss per joint, as mmpose loops
        return per_joint.sum() / k * self.loss_weight
