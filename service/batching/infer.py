"""``infer(crops) -> heatmaps`` callables: a model's engine on one device, or a pool's batcher.

The worker pool only needs a callable per model and device (:func:`make_infer`, the pool's
reading of :func:`ditepose.model.engines.build_engine`: the project's optimised engine, or that
engine in a child process). :class:`BatcherInfer` is the other way round: an ``infer`` for the
evaluation loop that sends the crops through a pool's batcher as background work, so an
evaluation job is batched with (and yields to) live requests instead of competing with them
for the cores.
"""

from __future__ import annotations

import torch
from torch import nn

from ditepose.model.engines import InferFn, buckets_up_to, build_engine
from ditepose.service.batching.batcher import DynamicBatcher

__all__ = ["BatcherInfer", "InferFn", "make_infer"]


def make_infer(
    module: nn.Module, device: str, precision: str = "auto", process: bool = False, threads: int | None = None,
    cuda_graphs: bool = False, max_batch_size: int = 32, input_hw: tuple[int, int] = (256, 192),
) -> InferFn:
    """The infer callable of ``module`` on ``device`` (``precision``: a setting, ``"auto"`` allowed).

    ``process``: on CPU, the optimised engine runs in a child process with ``threads`` torch
    threads (default 1); ignored on other devices. ``cuda_graphs``: on a CUDA device, one graph
    per batch bucket (powers of two up to ``max_batch_size``), all captured here at ``input_hw``
    so that no request pays for a capture; ignored on CPU devices."""
    on_cpu, graphed = device.startswith("cpu"), cuda_graphs and device.startswith("cuda")
    return build_engine(
        module, device, precision, process=process and on_cpu, threads=threads,
        cuda_graphs=graphed, batch_buckets=buckets_up_to(max_batch_size) if graphed else None,
        warmup_hw=input_hw if graphed else None,
    )


class BatcherInfer:
    """``infer(crops)`` through ``batcher`` as a background submission (blocks the calling thread)."""

    def __init__(self, batcher: DynamicBatcher, timeout_s: float) -> None:
        self.batcher = batcher
        self.timeout_s = timeout_s

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        return self.batcher.submit_sync(crops, self.timeout_s, background=True)
