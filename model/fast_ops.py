"""Tensor-layout helpers of the inference-only network (model.fast_blocks).

Channels-last bookkeeping, the one-copy channel shuffle, attention pooling as matmuls and
nearest upsampling as broadcasting: the pieces that let ``fast_blocks`` avoid materialising
intermediate tensors. Exporters (ONNX, tracing) get out-of-place variants.
"""

from __future__ import annotations

import torch


def tracing() -> bool:
    """Exporters get out-of-place ops (stack, broadcast add) instead of writes into views."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """``channel_shuffle(cat(parts), len(parts))`` for equal parts, in one copy."""
    if tracing():
        b, c, h, w = parts[0].shape
        return torch.stack(parts, dim=2).reshape(b, c * len(parts), h, w)
    full, slots = interleaved_buffer(parts[0], parts[0].shape[1] * len(parts), len(parts))
    for slot, part in zip(slots, parts, strict=True):
        slot.copy_(part)
    return full


def interleaved_buffer(
    like: torch.Tensor, channels: int, groups: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """An empty [B, channels, H, W] tensor whose channel ``c * groups + g`` is slot ``g``'s channel ``c``.

    Writing group ``g`` into ``slots[g]`` is ``channel_shuffle(cat(groups), groups)`` in one copy.
    The buffer follows ``like``'s memory format (NCHW or channels-last).
    """
    batch, _, height, width = like.shape
    per = channels // groups
    if is_channels_last(like):
        buf = like.new_empty(batch, height, width, per, groups)
        full = buf.view(batch, height, width, channels).permute(0, 3, 1, 2)
        return full, [buf[..., g].permute(0, 3, 1, 2) for g in range(groups)]
    buf = like.new_empty(batch, per, groups, height, width)
    return buf.view(batch, channels, height, width), [buf[:, :, g] for g in range(groups)]


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-D tensor whose channels are innermost in memory (channels-last, or a channel
    slice of one), unless it is also plain contiguous (then both layouts are the same)."""
    # (called several hundred times per forward pass, so only the cheapest checks: 4-D callers only)
    return x.stride(1) == 1 and x.shape[1] > 1 and not x.is_contiguous()


def spatial_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1-output 1x1 conv as a matmul: [B, H*W] (row-major spatial order) in either layout.

    mkldnn runs a one-channel 1x1 conv at batch 32 about 10x slower than this matmul.
    """
    batch, channels, height, width = x.shape
    if is_channels_last(x):
        return torch.matmul(x.permute(0, 2, 3, 1).reshape(batch, height * width, channels), weight) + bias
    return torch.matmul(weight, x.reshape(batch, channels, height * width)) + bias


def attention_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_hw x[b, c, hw] * mask[b, hw] -> [B, C] in either layout."""
    batch, channels, height, width = x.shape
    if is_channels_last(x):
        flat = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        return torch.bmm(mask[:, None, :], flat).view(batch, channels)
    return torch.bmm(x.reshape(batch, channels, height * width), mask[:, :, None]).view(batch, channels)


def upsampled_view(target: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """6-D views so that ``a op b`` equals ``target op nearest_upsample(source)`` without materialising it."""
    batch, channels, height, width = target.shape
    fy, fx = height // source.shape[-2], width // source.shape[-1]
    return (
        target.view(batch, channels, source.shape[-2], fy, source.shape[-1], fx),
        source[:, :, :, None, :, None],
    )


def add_upsampled_(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``target += nearest_upsample(source)`` in place (integer factors)."""
    if target.shape[-2:] == source.shape[-2:]:
        return target + source if tracing() else target.add_(source)
    big, small = upsampled_view(target, source)
    if tracing():
        return (big + small).reshape(target.shape)
    big.add_(small)
    return target


def keep_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with canonical channels-last strides when its channels are innermost.

    oneDNN runs a conv (and returns its output) in NCHW unless the input's strides are exactly
    channels-last; a channel slice, or a batch of one with an odd batch stride, would silently
    take the whole network out of channels-last, where its depth-wise convs are much slower."""
    if not is_channels_last(x):
        return x
    _, channels, height, width = x.shape
    canonical = (channels * height * width, 1, width * channels, channels)
    if x.stride() == canonical:
        return x
    if x.is_contiguous(memory_format=torch.channels_last):  # only a size-1 dim's stride differs
        return x.as_strided(x.shape, canonical)
    return x.contiguous(memory_format=torch.channels_last)


def write_scaled(slot: torch.Tensor, x: torch.Tensor, factor: float) -> None:
    """``slot[...] = x * factor`` in one pass (a copy when the factor is 1 or under mixed dtypes)."""
    if factor == 1.0:
        slot.copy_(x)
    elif x.dtype == slot.dtype:
        torch.mul(x, factor, out=slot)
    else:  # autocast: ``out=`` may not down-cast
        slot.copy_(x).mul_(factor)
