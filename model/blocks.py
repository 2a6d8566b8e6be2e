"""Building blocks of Dite-HRNet: dynamic kernels, dynamic split convolution, context modelling.

Attribute names mirror the authors' mmpose implementation so that their checkpoints load
unchanged (``conv.attention.conv1``, ``conv.aggregation.weight``, ``channel_attention.0`` ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: interleave the channels of ``groups`` equal groups."""
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width)
    return x.transpose(1, 2).reshape(batch, channels, height, width)


class KernelAttention(nn.Module):
    """Input-dependent sigmoid weights for N kernels: GAP -> 1x1 conv -> BN -> ReLU -> 1x1 conv -> sigmoid."""

    def __init__(self, channels: int, num_kernels: int, reduction: int = 4) -> None:
        super().__init__()
        mid_channels = channels // reduction if channels != 3 else num_kernels
        self.conv1 = nn.Conv2d(channels, mid_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, num_kernels, kernel_size=1, bias=True)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.conv2.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(cast(torch.Tensor, self.conv2.bias))  # built with bias=True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1)
        x = F.relu(self.bn(self.conv1(x)))
        return torch.sigmoid(self.conv2(x).flatten(1))


class KernelBank(nn.Module):
    """N candidate kernels, mixed per sample by the attention weights.

    The default forward folds the batch into convolution groups, so every sample is
    convolved with its own aggregated kernel in a single ``conv2d`` call.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        groups: int,
        num_kernels: int,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.groups = groups
        self.num_kernels = num_kernels
        self.weight = nn.Parameter(
            torch.empty(num_kernels, out_channels, in_channels // groups, kernel_size, kernel_size)
        )
        for i in range(num_kernels):
            nn.init.kaiming_uniform_(self.weight.data[i])

    def aggregated_weight(self, attention: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels [B * out, in / groups, k, k] = attention [B, N] @ bank [N, ...]."""
        batch = attention.shape[0]
        mixed = torch.mm(attention, self.weight.reshape(self.num_kernels, -1))
        return mixed.reshape(batch * self.out_channels, self.in_channels // self.groups, *self.weight.shape[-2:])

    def forward(self, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        out = F.conv2d(
            x.reshape(1, batch * self.in_channels, height, width),
            self.aggregated_weight(attention),
            stride=self.stride,
            padding=self.padding,
            groups=self.groups * batch,
        )
        return out.reshape(batch, self.out_channels, out.shape[-2], out.shape[-1])


class DynamicKernelConv(nn.Module):
    """Dynamic kernel aggregation: a convolution whose kernel is a sigmoid-weighted mix of N kernels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        num_kernels: int = 4,
    ) -> None:
        super().__init__()
        if in_channels % groups:
            raise ValueError(f"in_channels {in_channels} is not divisible by groups {groups}")
        self.attention = KernelAttention(in_channels, num_kernels=num_kernels)
        self.aggregation = KernelBank(
            in_channels, out_channels, kernel_size, stride, padding, groups, num_kernels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregation(x, self.attention(x))


class ConvNorm(nn.Module):
    """Convolution (static, or dynamic when ``num_kernels > 1``) + BatchNorm (+ ReLU)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        num_kernels: int = 1,
        relu: bool = False,
    ) -> None:
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        if num_kernels > 1:
            self.conv: nn.Module = DynamicKernelConv(
                in_channels, out_channels, kernel_size, stride, padding, groups, num_kernels
            )
        else:
            self.conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
            )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.relu is not None else x


def split_channels(channels: int, num_groups: int) -> list[int]:
    """Equal groups, the first one taking the remainder (as the reference does)."""
    sizes = [channels // num_groups] * num_groups
    sizes[0] += channels - sum(sizes)
    return sizes


class DynamicSplitConv(nn.Module):
    """Dynamic split convolution: G channel groups, depth-wise kernels 3, 5, 7, 9, concat, shuffle."""

    def __init__(self, channels: int, stride: int, num_groups: int, num_kernels: int) -> None:
        super().__init__()
        if not 1 <= num_groups <= 4:
            raise ValueError(f"dynamic split convolution takes 1 to 4 groups, got {num_groups}")
        self.num_groups = num_groups
        self.split_channels = split_channels(channels, num_groups)
        self.conv = nn.ModuleList(
            ConvNorm(
                c, c, kernel_size=2 * i + 3, stride=stride, padding=i + 1, groups=c, num_kernels=num_kernels
            )
            for i, c in enumerate(self.split_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_groups == 1:
            return self.conv[0](x)
        parts = torch.split(x, self.split_channels, dim=1)
        x = torch.cat([conv(part) for conv, part in zip(self.conv, parts, strict=True)], dim=1)
        return channel_shuffle(x, self.num_groups)


def _channel_attention(channels: int, mid_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, mid_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, channels, kernel_size=1, bias=True),
        nn.Sigmoid(),
    )


class GlobalContext(nn.Module):
    """Global context modelling of one branch: attention pooling -> channel weights -> BN(x * w)."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1, bias=True)
        self.channel_attention = _channel_attention(channels, channels // reduction)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        mask = torch.softmax(self.conv_mask(x).reshape(batch, 1, height * width), dim=2)
        # [B, C, HW] @ [B, HW, 1] -> [B, C, 1]
        context = torch.bmm(x.reshape(batch, channels, height * width), mask.transpose(1, 2))
        weights = self.channel_attention(context.unsqueeze(-1))
        return self.bn(x * weights)


class DenseContext(nn.Module):
    """Dense context modelling: pools every branch to the lowest resolution, joint channel attention."""

    def __init__(self, channels: Sequence[int], reduction: int) -> None:
        super().__init__()
        self.channels = list(channels)
        total = sum(self.channels)
        self.conv_mask = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=True) for c in self.channels)
        self.channel_attention = _channel_attention(total, total // reduction)

    def _pool(self, x: torch.Tensor, mini_size: tuple[int, int], index: int) -> torch.Tensor:
        """Attention-pool ``x`` to ``mini_size``.

        The reference reinterprets the flat [C, H*W] map as [cells, C, H*W/cells] (a raw view,
        not a spatial tiling); the checkpoints were trained with exactly this, so we keep it.
        """
        batch, channels, height, width = x.shape
        cells = mini_size[0] * mini_size[1]
        per_cell = (height * width) // cells
        values = x.reshape(batch, cells, channels, per_cell)
        mask = torch.softmax(self.conv_mask[index](x).reshape(batch, 1, height * width), dim=2)
        mask = mask.reshape(batch, cells, per_cell, 1)
        pooled = torch.matmul(values, mask)  # [B, cells, C, 1]
        return pooled.permute(0, 2, 1, 3).reshape(batch, channels, mini_size[0], mini_size[1])

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        mini_size = (xs[-1].shape[-2], xs[-1].shape[-1])
        pooled = [self._pool(x, mini_size, i) for i, x in enumerate(xs[:-1])] + [xs[-1]]
        weights = self.channel_attention(torch.cat(pooled, dim=1))
        out = []
        for x, w in zip(xs, torch.split(weights, self.channels, dim=1), strict=True):
            if w.shape[-2:] != x.shape[-2:]:
                w = F.interpolate(w, size=x.shape[-2:], mode="nearest")
            out.append(x * w)
        return out


class DepthwiseSeparable(nn.Module):
    """3x3 depth-wise conv + BN, then 1x1 conv + BN + ReLU (mmcv's DepthwiseSeparableConvModule)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvNorm(in_channels, in_channels, 3, 1, 1, groups=in_channels)
        self.pointwise_conv = ConvNorm(in_channels, out_channels, 1, 1, 0, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))
