"""Inference-only building blocks of Dite-HRNet, built from a trained model by ``ditepose.model.optimize``.

Same function as ``ditepose.model.blocks`` in eval mode, arranged for speed on small tensors:

* every BatchNorm is folded into the convolution (or kernel bank, or channel scale) before it;
* channels-last end to end when ``FastPoseNet.channels_last`` (the engine's default): oneDNN's
  NCHW depth-wise convs are many times slower; channel slices get canonical strides before a
  conv, 1x1 convs are GEMMs over the pixels;
* the attention MLPs run as ``addmm`` on pooled vectors instead of 1x1 convs on 1x1 maps;
* a dynamic 1x1 conv is a batched matmul with the per-sample [Cout, Cin] kernel; a dynamic
  depth-wise conv is the authors' batch-folded grouped conv, or on channels-last CPU maps one
  oneDNN call per sample (measured fastest on large maps);
* ``channel_shuffle(cat(a, b))`` is one strided copy into an interleaved buffer, and the last
  elementwise op before it writes straight into its slot (scaled there when the fusion needs it);
* nearest upsampling before an add or a multiply is a broadcast over a 6-D view: the
  upsampled tensor is never materialised.

Layout helpers live in ``ditepose.model.fast_ops``.

None of these modules has trainable state or a training mode: convert, then call.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ditepose.model.dite_hrnet import iterative_refine
from ditepose.model.fast_ops import (
    add_upsampled_,
    attention_pool,
    interleave,
    interleaved_buffer,
    is_channels_last,
    keep_channels_last,
    spatial_logits,
    tracing,
    upsampled_view,
    write_scaled,
)

DYNAMIC_MODES = ("grouped", "fast", "stacked")

# Channels-last CPU, batch > 1: a per-sample depth-wise conv runs as one oneDNN call per sample on maps
# at least this large (oneDNN's NHWC depth-wise kernel is fast per sample but slow on the
# batch-folded [1, B*C, H, W] tensor), as the batch-folded NCHW conv on smaller maps.
PER_SAMPLE_MIN_PIXELS = 2048


class FoldedConv2d(nn.Conv2d):
    """A static conv with its BatchNorm folded in; keeps a channels-last input channels-last.

    A dense 1x1 conv on channels-last maps is one GEMM over the pixels ([B*H*W, Cin] x [Cin, Cout]):
    it runs as ``F.linear`` on the NHWC view, with no layout conversion on the way in or out."""

    def __init__(self, *args, **kwargs) -> None:  # nn.Conv2d's signature
        super().__init__(*args, **kwargs)
        self.pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1 and self.padding == (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pointwise and is_channels_last(x) and not tracing():
            out = F.linear(x.permute(0, 2, 3, 1), self.weight.view(self.out_channels, self.in_channels), self.bias)
            return out.permute(0, 3, 1, 2)
        return super().forward(keep_channels_last(x))


class PooledMLP(nn.Module):
    """GAP or given vector -> linear (BN folded) -> ReLU -> linear -> sigmoid, on [B, C] vectors.

    Weights are stored transposed for ``addmm``: ``F.linear`` would transpose them on every call
    (a few hundred extra ops per forward pass, which at batch 1 is mostly dispatch overhead)."""

    w1t: torch.Tensor  # buffers (declared for the type checker; registered in __init__)
    b1: torch.Tensor
    w2t: torch.Tensor
    b2: torch.Tensor

    def __init__(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w1t", w1.t().contiguous())
        self.register_buffer("b1", b1)
        self.register_buffer("w2t", w2.t().contiguous())
        self.register_buffer("b2", b2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        hidden = torch.addmm(self.b1, pooled, self.w1t).relu_()
        return torch.addmm(self.b2, hidden, self.w2t).sigmoid_()


class FastDynamicConv(nn.Module):
    """Dynamic-kernel conv with the following BatchNorm folded into the bank (rows scaled) and a bias.

    ``mode='grouped'`` is the authors' batch-as-groups conv; ``'fast'`` uses a batched matmul for
    dense 1x1 kernels and the grouped conv otherwise (depth-wise: fastest by measurement).
    """

    bank: torch.Tensor  # buffers (declared for the type checker; registered in __init__)
    bias: torch.Tensor
    stacked: torch.Tensor

    def __init__(
        self,
        attention: PooledMLP,
        bank: torch.Tensor,
        bias: torch.Tensor,
        stride: int,
        padding: int,
        groups: int,
        relu: bool,
        mode: str = "fast",
    ) -> None:
        super().__init__()
        if mode not in DYNAMIC_MODES:
            raise ValueError(f"dynamic mode must be one of {DYNAMIC_MODES}, got {mode!r}")
        self.attention = attention
        self.num_kernels, self.out_channels, self.in_per_group, kh, kw = bank.shape
        self.kernel_size = (kh, kw)
        self.register_buffer("bank", bank.reshape(self.num_kernels, -1).contiguous())
        self.register_buffer("bias", bias)
        self.stride, self.padding, self.groups, self.relu = stride, padding, groups, relu
        dense_1x1 = groups == 1 and kh == kw == 1 and stride == 1 and padding == 0
        self.use_matmul = mode in ("fast", "stacked") and dense_1x1
        # 'stacked': one static conv with all N kernels, then the attention-weighted sum over N
        # (linear in the kernel, so exact); static groups, so it exports for any batch size.
        self.use_stacked = mode == "stacked" and not dense_1x1
        if self.use_stacked:
            if groups != self.out_channels or self.in_per_group != 1:
                raise ValueError("the stacked dynamic path supports depth-wise kernels only")
            # [N, C, 1, k, k] -> [C * N, 1, k, k]: group c holds its N candidate kernels
            stacked = bank.transpose(0, 1).reshape(self.out_channels * self.num_kernels, 1, kh, kw)
            self.register_buffer("stacked", stacked.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        attention = self.attention.forward(x.mean((2, 3)))  # [B, N] (no hooks: skip Module.__call__)
        if self.use_stacked:
            y = F.conv2d(x, self.stacked, None, self.stride, self.padding, groups=channels)
            y = y.view(batch, channels, self.num_kernels, y.shape[-2], y.shape[-1])
            out = torch.einsum("bcnhw,bn->bchw", y, attention) + self.bias[:, None, None]
            return F.relu(out, inplace=True) if self.relu else out
        weights = torch.mm(attention, self.bank)  # [B, Cout * Cin/g * k * k]
        if self.use_matmul:
            kernels = weights.view(batch, self.out_channels, channels)
            if is_channels_last(x):
                flat = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
                out = torch.baddbmm(self.bias, flat, kernels.transpose(1, 2))
                out = out.view(batch, height, width, self.out_channels).permute(0, 3, 1, 2)
            else:
                out = torch.baddbmm(self.bias[:, None], kernels, x.reshape(batch, channels, height * width))
                out = out.view(batch, self.out_channels, height, width)
        elif is_channels_last(x):
            out = self._conv_channels_last(x, weights)
        else:
            out = self._conv_folded(x, weights)
        return F.relu(out, inplace=True) if self.relu else out

    def _conv_folded(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The authors' per-sample kernels: the batch folded into the groups of one NCHW conv."""
        batch, channels, height, width = x.shape
        out = F.conv2d(
            x.reshape(1, batch * channels, height, width),
            weights.view(batch * self.out_channels, self.in_per_group, *self.kernel_size),
            self.bias.repeat(batch),
            stride=self.stride,
            padding=self.padding,
            groups=self.groups * batch,
        )
        return out.view(batch, self.out_channels, out.shape[-2], out.shape[-1])

    def _conv_channels_last(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels on a channels-last batch; the result stays channels-last."""
        batch, _, height, width = x.shape
        per_sample = height * width >= PER_SAMPLE_MIN_PIXELS and x.device.type == "cpu"  # CUDA: a launch each
        if batch > 1 and not per_sample:  # the folded conv copies to NCHW anyway
            return self._conv_folded(x, weights).contiguous(memory_format=torch.channels_last)
        x = keep_channels_last(x)
        kernels = weights.view(batch, self.out_channels, self.in_per_group, *self.kernel_size)
        conv = dict(stride=self.stride, padding=self.padding, groups=self.groups)
        if batch == 1:
            return F.conv2d(x, kernels[0], self.bias, **conv)
        return torch.cat([F.conv2d(x[i : i + 1], kernels[i], self.bias, **conv) for i in range(batch)])


class FastGlobalContext(nn.Module):
    """Global context with its BatchNorm folded: ``x * (w * scale) + shift``, optionally into ``out``."""

    mask_weight: torch.Tensor  # buffers (declared for the type checker; registered in __init__)
    mask_bias: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, mask: nn.Conv2d, attention: PooledMLP, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask_weight", mask.weight.detach().flatten())
        self.register_buffer("mask_bias", cast(torch.Tensor, mask.bias).detach())  # folded convs have a bias
        self.attention = attention
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift[:, None, None])

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.softmax(spatial_logits(x, self.mask_weight, self.mask_bias), dim=1)
        context = attention_pool(x, mask)
        weights = (self.attention(context) * self.scale)[:, :, None, None]
        if out is None:
            return torch.addcmul(self.shift, x, weights)
        return torch.addcmul(self.shift, x, weights, out=out)


class FastDenseContext(nn.Module):
    """Dense context modelling; the per-branch weights are broadcast, not upsampled."""

    def __init__(self, masks: nn.ModuleList, attention: PooledMLP, channels: list[int]) -> None:
        super().__init__()
        convs = [cast(nn.Conv2d, m) for m in masks]
        self.mask_weight = nn.ParameterList(
            nn.Parameter(c.weight.detach().flatten(), requires_grad=False) for c in convs
        )
        self.mask_bias = nn.ParameterList(
            nn.Parameter(cast(torch.Tensor, c.bias).detach(), requires_grad=False) for c in convs  # folded: biased
        )
        self.attention = attention
        self.channels = channels

    def _pool(self, x: torch.Tensor, mini: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        cells = mini[0] * mini[1]
        per_cell = (height * width) // cells
        values = x.reshape(batch, cells, channels, per_cell)  # the reference's raw reinterpretation
        mask = torch.softmax(spatial_logits(x, weight, bias).reshape(batch, height * width), dim=1)
        mask = mask.view(batch, cells, per_cell, 1)
        pooled = torch.matmul(values, mask)
        return pooled.permute(0, 2, 1, 3).reshape(batch, channels, mini[0], mini[1])

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        mini = (xs[-1].shape[-2], xs[-1].shape[-1])
        pooled = [
            self._pool(x, mini, w, b) for x, w, b in zip(xs[:-1], self.mask_weight, self.mask_bias, strict=False)
        ]
        joint = torch.cat([*pooled, xs[-1]], dim=1)
        batch, total, mh, mw = joint.shape
        # channel attention of the reference = per-cell MLP over channels (1x1 convs)
        weights = self.attention(joint.permute(0, 2, 3, 1).reshape(-1, total))
        weights = weights.view(batch, mh, mw, total).permute(0, 3, 1, 2)
        out = []
        for x, w in zip(xs, torch.split(weights, self.channels, dim=1), strict=True):
            if x.shape[-2:] == w.shape[-2:]:
                out.append(x * w)
            else:
                big, small = upsampled_view(x, w)
                out.append((big * small).reshape(x.shape))
        return out


class FastSplitConv(nn.Module):
    """Dynamic split convolution: per-group convs written straight into the shuffled buffer."""

    def __init__(self, convs: nn.ModuleList, split: list[int]) -> None:
        super().__init__()
        self.conv = convs
        self.split = split
        self.equal = len(set(split)) == 1
        self._convs = list(convs)  # plain list: no ModuleList indexing in the hot loop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self._convs) == 1:
            return self._convs[0](x)
        parts = [conv(p) for conv, p in zip(self._convs, torch.split(x, self.split, dim=1), strict=True)]
        if not self.equal:  # the reference's remainder split; shuffle the plain way
            y = torch.cat(parts, dim=1)
            b, c, h, w = y.shape
            return y.view(b, len(parts), c // len(parts), h, w).transpose(1, 2).reshape(b, c, h, w)
        return interleave(parts)


class FastBlock(nn.Module):
    """DMC block: pass half, DCM -> DSC -> GCM on the other half, the GCM writing into the shuffle."""

    def __init__(
        self, dcm: FastDenseContext | None, convs: nn.ModuleList, gcm: nn.ModuleList | None, branch0_factor: float = 1.0
    ) -> None:
        super().__init__()
        # branch 0's output times this: the passed half at its copy, the worked half inside the GCM
        # (folded at conversion); without a GCM, at its copy too
        self.branch0_factor = branch0_factor
        self.dcm = dcm
        self.conv = convs
        self.gcm = gcm
        self._convs = [c.forward for c in convs]  # no hooks on these: skip Module.__call__
        self._gcms = [g.forward for g in gcm] if gcm is not None else None

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        passed = [x[:, : x.shape[1] // 2] for x in xs]
        worked = [x[:, x.shape[1] // 2 :] for x in xs]
        if self.dcm is not None:
            worked = self.dcm.forward(worked)
        worked = [conv(w) for conv, w in zip(self._convs, worked, strict=True)]
        out = []
        for i, (a, b) in enumerate(zip(passed, worked, strict=True)):
            factor = self.branch0_factor if i == 0 else 1.0
            if tracing():
                b = self._gcms[i](b) if self._gcms is not None else b * factor
                out.append(interleave([a * factor if factor != 1.0 else a, b]))
                continue
            full, (slot_a, slot_b) = interleaved_buffer(b, 2 * b.shape[1], 2)
            write_scaled(slot_a, a, factor)
            if self._gcms is not None:
                self._gcms[i](b, out=slot_b)
            else:
                write_scaled(slot_b, b, factor)
            out.append(full)
        return out


class FastCrossResolution(nn.Module):
    """DMC blocks then multi-scale fusion, upsampling by broadcast adds, the branch-0 doublings folded
    (into the last block's output for row 0, into the paths' last convs for rows i > 0)."""

    def __init__(self, layers: nn.Sequential, fuse: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers
        # [i][j]: Identity on the diagonal; [i][0] for i > 0 already doubled; paths j > i end with a
        # nearest upsample, done by ``add_upsampled_`` from the shapes
        self.fuse_layers = fuse
        self._blocks = [block.forward for block in layers]  # no hooks on these: skip Module.__call__
        self._fuse = [list(cast(nn.ModuleList, row)) for row in fuse]

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = xs
        for block in self._blocks:
            out = block(out)
        n = len(out)
        inplace = not tracing()
        fused0 = out[0]  # already 2 * branch 0: the last block doubled it (see FastBlock.branch0_factor)
        for j in range(1, n):
            fused0 = add_upsampled_(fused0, self._fuse[0][j](out[j]))
        fused0 = F.relu(fused0, inplace=inplace)
        results = [fused0]
        for i in range(1, n):
            y = self._fuse[i][0](fused0)
            for j in range(1, n):
                y = add_upsampled_(y, out[j] if i == j else self._fuse[i][j](out[j]))
            results.append(F.relu(y, inplace=inplace))
        return results


class FastStem(nn.Module):
    """Stem: fused conv1, two dynamic branches, concatenation + shuffle in one strided copy."""

    def __init__(self, conv1: nn.Module, branch1: nn.Module, branch2: nn.Module) -> None:
        super().__init__()
        self.conv1 = conv1
        self.branch1 = branch1
        self.branch2 = branch2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.conv1(x).chunk(2, dim=1)
        return interleave([self.branch1(x1), self.branch2(x2)])


class FastHead(nn.Module):
    """Iterative head (bilinear, align_corners=True, as the reference) and the 1x1 heatmap layer."""

    def __init__(self, projects: nn.ModuleList, final: nn.Conv2d) -> None:
        super().__init__()
        self.projects = projects
        self.final_layer = final

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.final_layer(iterative_refine(self.projects, xs))


class FastPoseNet(nn.Module):
    """The whole optimised network: NCHW batch in, heatmaps out, same function as ``TopDownPoseNet.eval()``."""

    def __init__(
        self,
        stem: FastStem,
        transitions: nn.ModuleList,
        stages: nn.ModuleList,
        head: FastHead,
        downsample_factor: int,
        num_joints: int,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.transitions = transitions
        self.stages = stages
        self.head = head
        self.downsample_factor = downsample_factor
        self.num_joints = num_joints
        self.channels_last = False  # run the network in channels-last memory format


    def check_input_size(self, height: int, width: int) -> None:
        factor = self.downsample_factor
        if height % factor or width % factor:
            raise ValueError(
                f"input size {width}x{height} (WxH) is not supported: both sides must be multiples of {factor}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an NCHW batch with 3 channels, got shape {tuple(x.shape)}")
        self.check_input_size(x.shape[-2], x.shape[-1])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        branches = [self.stem(x)]
        for transition, stage in zip(self.transitions, self.stages, strict=True):
            inputs = []
            for j, layer in enumerate(cast(nn.ModuleList, transition)):
                source = branches[j] if j < len(branches) else branches[-1]
                inputs.append(layer(source) if not isinstance(layer, nn.Identity) else source)
            branches = stage(inputs)
        return self.head(branches).contiguous()
