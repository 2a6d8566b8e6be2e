"""What every engine is (:class:`Engine`), and the one pad-and-split of fixed-batch engines.

An engine is called with a CPU float32 NCHW batch and answers CPU float32 heatmaps; the pool,
the estimator, the evaluation loop and the gate call nothing else, and ``describe()`` says how
it runs. Some runtimes only run fixed batch sizes (a compiled or CUDA-graphed torch engine, a
fixed-batch ONNX file): they answer any batch through :func:`run_in_buckets`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

InferFn = Callable[[torch.Tensor], torch.Tensor]


class Engine(Protocol):
    """CPU float32 NCHW crops in, CPU float32 heatmaps out; ``describe()`` for logs and reports."""

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, and ``max_batch`` itself: ``buckets_up_to(48) == (1, 2, ..., 32, 48)``.

    torch.compile and CUDA graphs specialise on the batch size: such an engine pads each batch up
    to one of these sizes (and splits larger ones), so a server builds a bounded set of graphs at
    warm-up. A service passes the powers of two up to its max_batch_size."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return tuple(sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch}))


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """``buckets`` sorted and deduplicated; ValueError unless every one is a positive batch size."""
    ordered = tuple(sorted(set(buckets)))
    if ordered and ordered[0] < 1:
        raise ValueError(f"batch_buckets must be positive batch sizes, got {tuple(buckets)!r}")
    return ordered


def run_in_buckets(run: InferFn, batch: torch.Tensor, buckets: Sequence[int]) -> torch.Tensor:
    """``run`` over ``batch`` in the batch sizes ``buckets`` (sorted, from :func:`check_buckets`) only.

    A batch larger than the largest bucket is split into parts of that size; each part is padded
    with zero rows up to the next bucket, and the padded rows' outputs are dropped. Samples never
    mix (every network here computes each row on its own), so results equal one unpadded call's."""
    largest = buckets[-1]
    outputs = []
    for part in batch.split(largest):
        rows = part.shape[0]
        size = next(b for b in buckets if b >= rows)
        if size > rows:
            part = torch.cat([part, part.new_zeros(size - rows, *part.shape[1:])])
        outputs.append(run(part)[:rows])
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
