"""Convert a trained ``TopDownPoseNet`` into the inference-only ``FastPoseNet`` (model.fast_blocks).

All folding is done in float64 and cast back to the model's dtype, so an optimised float64 model
agrees with the reference to ~1e-12 and a float32 one to float32 rounding.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ditepose.model import blocks
from ditepose.model import fast_blocks as fb
from ditepose.model.dite_hrnet import (
    CrossResolutionModule,
    DiteHRNet,
    DynamicMultiScaleContextBlock,
    TopDownPoseNet,
)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y = x * scale + shift`` (float64)."""
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.detach().double() - bn.running_mean.double() * scale
    return scale, shift


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, factor: float = 1.0) -> nn.Conv2d:
    """A conv with bias computing ``factor * bn(conv(x))``."""
    dtype = conv.weight.dtype
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if bn is not None:
        scale, shift = _bn_affine(bn)
        weight = weight * scale[:, None, None, None]
        bias = bias * scale + shift
    fused = fb.FoldedConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, device=conv.weight.device, dtype=dtype,
    )
    fused.weight.data.copy_((weight * factor).to(dtype))
    cast(torch.Tensor, fused.bias).data.copy_((bias * factor).to(dtype))  # built with bias=True
    return fused.requires_grad_(False)


def _mlp(conv1: nn.Conv2d, bn: nn.BatchNorm2d, conv2: nn.Conv2d) -> fb.PooledMLP:
    """conv1(no bias) -> BN -> ReLU -> conv2 -> sigmoid on 1x1 maps, as linear layers."""
    first = fold_conv_bn(conv1, bn)
    second = fold_conv_bn(conv2, None)
    first_bias, second_bias = cast(torch.Tensor, first.bias), cast(torch.Tensor, second.bias)  # folded: biased
    return fb.PooledMLP(
        first.weight.detach().flatten(1), first_bias.detach(), second.weight.detach().flatten(1), second_bias.detach()
    )


def _attention_mlp(channel_attention: nn.Sequential) -> fb.PooledMLP:
    """The reference's channel attention (conv, BN, ReLU, conv, sigmoid) as a PooledMLP."""
    ca = channel_attention
    return _mlp(cast(nn.Conv2d, ca[0]), cast(nn.BatchNorm2d, ca[1]), cast(nn.Conv2d, ca[3]))


def _seq(*modules: nn.Module | None) -> nn.Module:
    kept = [m for m in modules if m is not None]
    return kept[0] if len(kept) == 1 else nn.Sequential(*kept)


def convert_conv_norm(layer: blocks.ConvNorm, dynamic: str, factor: float = 1.0) -> nn.Module:
    relu = layer.relu is not None
    if isinstance(layer.conv, blocks.DynamicKernelConv):
        if factor != 1.0:
            raise ValueError("scaling a dynamic conv is not needed by the network")
        attention = layer.conv.attention
        bank_module = layer.conv.aggregation
        scale, shift = _bn_affine(layer.bn)
        dtype = bank_module.weight.dtype
        bank = bank_module.weight.detach().double() * scale[None, :, None, None, None]
        return fb.FastDynamicConv(
            _mlp(attention.conv1, attention.bn, attention.conv2),
            bank.to(dtype),
            shift.to(dtype),
            bank_module.stride,
            bank_module.padding,
            bank_module.groups,
            relu,
            mode=dynamic,
        )
    assert isinstance(layer.conv, nn.Conv2d)
    return _seq(fold_conv_bn(layer.conv, layer.bn, factor), nn.ReLU(inplace=True) if relu else None)


def convert_sequential(seq: nn.Sequential, factor: float = 1.0) -> nn.Module:
    """Fold every (Conv2d, BatchNorm2d) pair of a flat or nested Sequential; ``factor`` scales the last conv."""
    flat: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        if isinstance(module, nn.Sequential):
            for child in module:
                walk(child)
        else:
            flat.append(module)

    walk(seq)
    out: list[nn.Module] = []
    last_conv = max(i for i, m in enumerate(flat) if isinstance(m, nn.Conv2d))
    i = 0
    while i < len(flat):
        module = flat[i]
        if isinstance(module, nn.Conv2d):
            bn = cast(nn.BatchNorm2d, flat[i + 1]) if i + 1 < len(flat) and isinstance(flat[i + 1], nn.BatchNorm2d) else None
            out.append(fold_conv_bn(module, bn, factor if i == last_conv else 1.0))
            i += 2 if bn is not None else 1
        elif isinstance(module, nn.ReLU):
            out.append(nn.ReLU(inplace=True))
            i += 1
        elif isinstance(module, nn.Upsample):
            i += 1  # handled as a broadcast add by the caller
        else:
            raise TypeError(f"unexpected layer in a fuse/transition path: {type(module).__name__}")
    if factor != 1.0 and any(isinstance(m, nn.ReLU) for m in flat[last_conv:]):
        raise ValueError("a scaled path must end with a linear layer")
    return _seq(*out)


def convert_global_context(gc: blocks.GlobalContext, factor: float = 1.0) -> fb.FastGlobalContext:
    """``factor`` scales the output (folded into the BatchNorm's scale and shift)."""
    scale, shift = _bn_affine(gc.bn)
    dtype = gc.bn.weight.dtype
    return fb.FastGlobalContext(
        fold_conv_bn(gc.conv_mask, None), _attention_mlp(gc.channel_attention), (scale * factor).to(dtype),
        (shift * factor).to(dtype),
    )


def convert_dense_context(dc: blocks.DenseContext) -> fb.FastDenseContext:
    masks = nn.ModuleList(fold_conv_bn(cast(nn.Conv2d, m), None) for m in dc.conv_mask)
    return fb.FastDenseContext(masks, _attention_mlp(dc.channel_attention), list(dc.channels))


def convert_split_conv(dsc: blocks.DynamicSplitConv, dynamic: str) -> fb.FastSplitConv:
    convs = nn.ModuleList(convert_conv_norm(cast(blocks.ConvNorm, c), dynamic) for c in dsc.conv)
    return fb.FastSplitConv(convs, list(dsc.split_channels))


def convert_block(block: DynamicMultiScaleContextBlock, dynamic: str, branch0_factor: float = 1.0) -> fb.FastBlock:
    """``branch0_factor`` scales the block's branch-0 output (both halves), for free."""
    dcm = convert_dense_context(block.dcm) if block.dcm is not None else None
    gcm = (
        nn.ModuleList(convert_global_context(cast(blocks.GlobalContext, g), branch0_factor if i == 0 else 1.0)
                      for i, g in enumerate(block.gcm))
        if block.gcm is not None
        else None
    )
    convs = nn.ModuleList(convert_split_conv(cast(blocks.DynamicSplitConv, c), dynamic) for c in block.conv)
    return fb.FastBlock(dcm, convs, gcm, branch0_factor=branch0_factor)


def convert_cross_resolution(module: CrossResolutionModule, dynamic: str) -> fb.FastCrossResolution:
    n = module.num_branches
    fuse = nn.ModuleList()
    for i in range(n):
        row = nn.ModuleList()
        for j in range(n):
            path = cast("nn.Sequential | None", cast(nn.ModuleList, module.fuse_layers[i])[j])
            if path is None:
                row.append(nn.Identity())
            else:  # the eval-mode reference computes 2 * path(fused0) for j == 0, i > 0
                row.append(convert_sequential(path, factor=2.0 if j == 0 else 1.0))
        fuse.append(row)
    # fusion row 0 starts from 2 * (branch 0): the last block writes branch 0 already doubled
    last = len(module.layers) - 1
    layers = nn.Sequential(*(convert_block(cast(DynamicMultiScaleContextBlock, b), dynamic, 2.0 if k == last else 1.0)
                             for k, b in enumerate(module.layers)))
    return fb.FastCrossResolution(layers, fuse)


def _convert_stem_layer(layer: nn.Module, dynamic: str) -> nn.Module:
    """A stem branch's layer: a global context or a ConvNorm."""
    if isinstance(layer, blocks.GlobalContext):
        return convert_global_context(layer)
    return convert_conv_norm(cast(blocks.ConvNorm, layer), dynamic)


def convert_backbone(backbone: DiteHRNet, final: nn.Conv2d,
                     dynamic: str) -> tuple[fb.FastStem, nn.ModuleList, nn.ModuleList, fb.FastHead]:
    stem = backbone.stem
    fast_stem = fb.FastStem(
        convert_conv_norm(stem.conv1, dynamic),
        nn.Sequential(*(_convert_stem_layer(m, dynamic) for m in stem.branch1)),
        nn.Sequential(*(_convert_stem_layer(m, dynamic) for m in stem.branch2)),
    )
    transitions = nn.ModuleList()
    stages = nn.ModuleList()
    for stage in range(len(backbone.config.num_channels)):
        transition = getattr(backbone, f"transition{stage}")
        transitions.append(nn.ModuleList(
            nn.Identity() if layer is None else convert_sequential(layer) for layer in transition
        ))
        stages.append(nn.Sequential(*(
            convert_cross_resolution(m, dynamic) for m in getattr(backbone, f"stage{stage}")
        )))
    projects = nn.ModuleList(
        nn.Sequential(convert_conv_norm(p.depthwise_conv, dynamic), convert_conv_norm(p.pointwise_conv, dynamic))
        for p in (cast(blocks.DepthwiseSeparable, m) for m in backbone.head_layer.projects)
    )
    head = fb.FastHead(projects, fold_conv_bn(final, None))
    return fast_stem, transitions, stages, head


@torch.no_grad()
def optimize_for_inference(module: TopDownPoseNet, dynamic: str = "fast") -> fb.FastPoseNet:
    """An inference-only copy of ``module`` (its eval-mode function); ``module`` is left untouched.

    ``dynamic``: 'fast' (batched matmul for dynamic 1x1 convs) or 'grouped' (the authors' batch-as-groups conv).
    """
    if not isinstance(module, TopDownPoseNet):
        raise TypeError(f"expected a TopDownPoseNet, got {type(module).__name__}")
    if dynamic not in fb.DYNAMIC_MODES:
        raise ValueError(f"dynamic must be one of {fb.DYNAMIC_MODES}, got {dynamic!r}")
    stem, transitions, stages, head = convert_backbone(module.backbone, module.keypoint_head.final_layer, dynamic)
    fast = fb.FastPoseNet(stem, transitions, stages, head, module.config.downsample_factor, module.num_joints)
    device = next(module.parameters()).device
    return fast.to(device).eval().requires_grad_(False)
