"""How a batch's submissions become one network input, and its output their answers again.

Kept apart from the queueing (:mod:`ditepose.service.batching.batcher`): this is about tensors,
that about time and fairness.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ditepose.model.pipeline import normalize_crops


def assemble_batch(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The float32 [N, 3, H, W] network input of a batch's submissions, in order.

    Live requests queue their crops as uint8 [P, H, W, 3] (a quarter of the float32 size: a burst's
    queue of 512 crops of 256x192 holds 72 MiB instead of 288) and are normalised here, when their
    batch is assembled, by :func:`~ditepose.model.pipeline.normalize_crops` straight into the
    batch (the same constants and ops as normalising early, so the input is bit for bit the same).
    Float32 parts (evaluation jobs, detector inputs) are copied as they are."""
    if all(part.dtype != torch.uint8 for part in parts):
        return concat_outputs(parts)
    first = parts[0]
    height, width = (first.shape[1:3] if first.dtype == torch.uint8 else first.shape[2:4])
    out = torch.empty((sum(int(p.shape[0]) for p in parts), 3, height, width), dtype=torch.float32)
    start = 0
    for part in parts:
        rows = out[start : start + int(part.shape[0])]
        if part.dtype == torch.uint8:
            normalize_crops(part, rows)
        else:
            rows.copy_(part)
        start += int(part.shape[0])
    return out


def concat_outputs(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors joined along the first axis (one submission's outputs from its chunks; float batch parts)."""
    return outputs[0] if len(outputs) == 1 else torch.cat(list(outputs), dim=0)
