"""Dite-HRNet (Li et al., IJCAI 2022): a dynamic lightweight high-resolution network.

The network is a function-for-function port of the authors' published mmpose implementation:
the state-dict layout is theirs (``backbone.*``, ``keypoint_head.final_layer.*``), so their
checkpoints load with ``strict=True`` and give the same heatmaps (checked to 1e-8 in float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ditepose.model.blocks import (
    ConvNorm,
    DenseContext,
    DepthwiseSeparable,
    DynamicSplitConv,
    GlobalContext,
    channel_shuffle,
)


@dataclass(frozen=True)
class DiteHRNetConfig:
    """Architecture of one Dite-HRNet variant. Per-branch tuples run from highest to lowest resolution."""

    name: str
    num_modules: tuple[int, int, int]
    stem_channels: int = 32
    num_branches: tuple[int, int, int] = (2, 3, 4)
    num_blocks: tuple[int, int, int] = (2, 2, 2)
    num_channels: tuple[tuple[int, ...], ...] = ((40, 80), (40, 80, 160), (40, 80, 160, 320))
    dsc_groups: tuple[int, int, int, int] = (1, 1, 2, 4)
    dsc_kernels: tuple[int, int, int, int] = (4, 4, 2, 1)
    gcm_reduction: tuple[int, int, int, int] = (4, 4, 8, 8)
    dcm_reduction: int = 8
    stem_kernels: int = 4
    use_dsc: bool = True
    use_dcm: bool = True
    use_gcm: bool = True
    num_joints: int = 17
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not (len(self.num_modules) == len(self.num_branches) == len(self.num_blocks) == len(self.num_channels)):
            raise ValueError("num_modules, num_branches, num_blocks and num_channels need one entry per stage")
        for branches, channels in zip(self.num_branches, self.num_channels, strict=True):
            if branches < 2 or branches != len(channels):
                raise ValueError(f"a stage needs >= 2 branches and one channel count each, got {channels}")
        if len(self.dsc_groups) < max(self.num_branches) or len(self.dsc_kernels) < max(self.num_branches):
            raise ValueError("dsc_groups and dsc_kernels need one entry per branch")

    @property
    def downsample_factor(self) -> int:
        """Input sides must divide by this: stem /4, then one /2 per extra branch."""
        return 4 * 2 ** (max(self.num_branches) - 1)


def _dw_pw(in_channels: int, out_channels: int, stride: int, relu: bool) -> list[nn.Module]:
    """3x3 depth-wise conv + BN + 1x1 conv + BN (+ ReLU), the cheap HRNet transition/fuse unit."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class Stem(nn.Module):
    """Dynamic global-context stem: 3x3/2 conv, then two dynamic branches over channel halves (/4 in all)."""

    def __init__(self, in_channels: int, stem_channels: int, num_kernels: int = 4) -> None:
        super().__init__()
        self.out_channels = stem_channels
        half = stem_channels // 2
        mid = half // 4
        self.conv1 = ConvNorm(in_channels, stem_channels, 3, 2, 1, relu=True)
        self.branch1 = nn.Sequential(
            ConvNorm(half, half, 3, 2, 1, groups=half, num_kernels=num_kernels),
            GlobalContext(half, reduction=4),
            ConvNorm(half, half, 1, 1, 0, num_kernels=num_kernels, relu=True),
        )
        self.branch2 = nn.Sequential(
            ConvNorm(half, half, 3, 1, 1, groups=half, num_kernels=num_kernels),
            GlobalContext(half, reduction=4),
            ConvNorm(half, mid, 1, 1, 0, num_kernels=num_kernels, relu=True),
            ConvNorm(mid, half, 1, 1, 0, num_kernels=num_kernels),
            ConvNorm(half, half, 3, 2, 1, groups=half, num_kernels=num_kernels, relu=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.conv1(x).chunk(2, dim=1)
        return channel_shuffle(torch.cat((self.branch1(x1), self.branch2(x2)), dim=1), 2)


class DynamicMultiScaleContextBlock(nn.Module):
    """DMC block: half the channels pass through, the other half get DCM -> DSC -> GCM; then shuffle."""

    def __init__(self, in_channels: Sequence[int], config: DiteHRNetConfig) -> None:
        super().__init__()
        half = [c // 2 for c in in_channels]
        num_branches = len(in_channels)
        self.dcm = DenseContext(half, config.dcm_reduction) if config.use_dcm else None
        groups = config.dsc_groups if config.use_dsc else (1,) * num_branches
        kernels = config.dsc_kernels if config.use_dsc else (1,) * num_branches
        self.conv = nn.ModuleList(
            DynamicSplitConv(c, stride=1, num_groups=groups[i], num_kernels=kernels[i]) for i, c in enumerate(half)
        )
        self.gcm = (
            nn.ModuleList(GlobalContext(c, config.gcm_reduction[i]) for i, c in enumerate(half))
            if config.use_gcm
            else None
        )

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        halves = [x.chunk(2, dim=1) for x in xs]
        passed = [h[0] for h in halves]
        worked = [h[1] for h in halves]
        if self.dcm is not None:
            worked = self.dcm(worked)
        worked = [conv(x) for conv, x in zip(self.conv, worked, strict=True)]
        if self.gcm is not None:
            worked = [gcm(x) for gcm, x in zip(self.gcm, worked, strict=True)]
        return [channel_shuffle(torch.cat((a, b), dim=1), 2) for a, b in zip(passed, worked, strict=True)]


def _module_list(modules: list[nn.Module | None]) -> nn.ModuleList:
    """A ModuleList whose ``None`` entries mean "no layer" (``nn.Module.add_module`` accepts None;
    the reference's checkpoints number their layers with those gaps)."""
    return nn.ModuleList(cast(list[nn.Module], modules))


class CrossResolutionModule(nn.Module):
    """A stage module: DMC blocks on every branch, then multi-scale fusion across branches."""

    def __init__(self, in_channels: Sequence[int], num_blocks: int, config: DiteHRNetConfig) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.num_branches = len(in_channels)
        self.layers = nn.Sequential(
            *(DynamicMultiScaleContextBlock(in_channels, config) for _ in range(num_blocks))
        )
        self.fuse_layers = nn.ModuleList(
            _module_list([self._fuse_path(j, i) for j in range(self.num_branches)])
            for i in range(self.num_branches)
        )
        self.relu = nn.ReLU(inplace=False)

    def _fuse_path(self, source: int, target: int) -> nn.Module | None:
        channels = self.in_channels
        if source == target:
            return None
        if source > target:
            return nn.Sequential(
                nn.Conv2d(channels[source], channels[target], 1, 1, 0, bias=False),
                nn.BatchNorm2d(channels[target]),
                nn.Upsample(scale_factor=2 ** (source - target), mode="nearest"),
            )
        steps = target - source
        return nn.Sequential(
            *(
                nn.Sequential(
                    *_dw_pw(
                        channels[source],
                        channels[target] if k == steps - 1 else channels[source],
                        stride=2,
                        relu=k != steps - 1,
                    )
                )
                for k in range(steps)
            )
        )

    def _path(self, target: int, source: int) -> nn.Module:
        """``fuse_layers[target][source]``: the path from branch ``source`` to output ``target``."""
        return cast(nn.ModuleList, self.fuse_layers[target])[source]

    def _from_branch0(self, target: int, branch0: torch.Tensor) -> torch.Tensor:
        """The reference adds the branch-0 path twice for every output (see ``forward``)."""
        path = self._path(target, 0)
        if self.training:  # run it twice, as the reference does, so BN statistics update identically
            return path(branch0) + path(branch0)
        return 2 * path(branch0)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = self.layers(xs)
        # The reference starts output 0 from branch 0 and then adds branch 0 again, in place, and
        # applies an in-place ReLU, so every later output sees the *fused, activated* branch 0, and
        # outputs i > 0 add their branch-0 path twice. Trained checkpoints depend on it; keep it.
        fused0 = out[0] + out[0]
        for j in range(1, self.num_branches):
            fused0 = fused0 + self._path(0, j)(out[j])
        fused0 = self.relu(fused0)
        results = [fused0]
        for i in range(1, self.num_branches):
            y = self._from_branch0(i, fused0)
            for j in range(1, self.num_branches):
                y = y + (out[j] if i == j else self._path(i, j)(out[j]))
            results.append(self.relu(y))
        return results


def iterative_refine(projects: nn.ModuleList, xs: list[torch.Tensor]) -> torch.Tensor:
    """The iterative head's loop, shared with the inference-only network (model/fast_blocks.py)."""
    last: torch.Tensor | None = None
    for project, x in zip(projects, xs[::-1], strict=True):
        if last is not None:
            x = x + F.interpolate(last, size=x.shape[-2:], mode="bilinear", align_corners=True)
        last = project(x)
    assert last is not None
    return last


class IterativeHead(nn.Module):
    """From the lowest to the highest resolution: upsample the previous output, add, refine."""

    def __init__(self, in_channels: Sequence[int]) -> None:
        super().__init__()
        channels = list(in_channels)[::-1]
        self.projects = nn.ModuleList(
            DepthwiseSeparable(c, channels[i + 1] if i + 1 < len(channels) else c) for i, c in enumerate(channels)
        )

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return iterative_refine(self.projects, xs)


class DiteHRNet(nn.Module):
    """The backbone: stem, three multi-branch stages with transitions, iterative head."""

    def __init__(self, config: DiteHRNetConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.config = config
        self.stem = Stem(in_channels, config.stem_channels, config.stem_kernels)
        previous = [config.stem_channels]
        for stage, channels in enumerate(config.num_channels):
            setattr(self, f"transition{stage}", self._transition(previous, list(channels)))
            modules = [
                CrossResolutionModule(channels, config.num_blocks[stage], config)
                for _ in range(config.num_modules[stage])
            ]
            setattr(self, f"stage{stage}", nn.Sequential(*modules))
            previous = list(channels)
        self.head_layer = IterativeHead(previous)
        self.out_channels = previous[0]

    @staticmethod
    def _transition(previous: list[int], current: list[int]) -> nn.ModuleList:
        layers: list[nn.Module | None] = []
        for i, out_channels in enumerate(current):
            if i < len(previous):
                if out_channels == previous[i]:
                    layers.append(None)
                else:
                    layers.append(nn.Sequential(*_dw_pw(previous[i], out_channels, stride=1, relu=True)))
            else:
                steps = i + 1 - len(previous)
                source = previous[-1]
                layers.append(
                    nn.Sequential(
                        *(
                            nn.Sequential(
                                *_dw_pw(source, out_channels if k == steps - 1 else source, stride=2, relu=True)
                            )
                            for k in range(steps)
                        )
                    )
                )
        return _module_list(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.stem(x)]
        for stage in range(len(self.config.num_channels)):
            transition = getattr(self, f"transition{stage}")
            inputs = []
            for j, layer in enumerate(transition):
                source = branches[j] if j < len(branches) else branches[-1]
                inputs.append(layer(source) if layer is not None else source)
            branches = getattr(self, f"stage{stage}")(inputs)
        return self.head_layer(branches)


class HeatmapHead(nn.Module):
    """A 1x1 convolution from the highest-resolution features to one heatmap per joint."""

    def __init__(self, in_channels: int, num_joints: int) -> None:
        super().__init__()
        self.final_layer = nn.Conv2d(in_channels, num_joints, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer(x)


class TopDownPoseNet(nn.Module):
    """Backbone + heatmap head: NCHW image batch in, [N, joints, H/4, W/4] heatmaps out."""

    def __init__(self, config: DiteHRNetConfig) -> None:
        super().__init__()
        self.config = config
        self.num_joints = config.num_joints
        self.backbone = DiteHRNet(config)
        self.keypoint_head = HeatmapHead(self.backbone.out_channels, config.num_joints)
        self.init_weights()

    def init_weights(self) -> None:
        """The authors' initialisation: static convs N(0, 0.001), BN weight 1; kernel banks keep Kaiming."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.001)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def check_input_size(self, height: int, width: int) -> None:
        factor = self.config.downsample_factor
        if height % factor or width % factor:
            raise ValueError(
                f"input size {width}x{height} (WxH) is not supported: both sides must be multiples of "
                f"{factor} (e.g. 192x256, 288x384, 256x256)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an NCHW batch with 3 channels, got shape {tuple(x.shape)}")
        self.check_input_size(x.shape[-2], x.shape[-1])
        return self.keypoint_head(self.backbone(x))
