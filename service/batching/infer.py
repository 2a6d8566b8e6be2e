"""``infer(crops) -> heatmaps`` callables: a model's engine on one device, or a pool's batcher.

The worker pool only needs a callable per model and device (:func:`make_infer`: the project's
optimised :class:`~ditepose.model.engine.InferenceEngine`, or its engine in a child process).
:class:`BatcherInfer` is the other way round: an ``infer`` for the evaluation loop that sends
the crops through a pool's batcher as background work, so an evaluation job is batched with
(and yields to) live requests instead of competing with them for the cores.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ditepose.service.batching.batcher import DynamicBatcher

InferFn = Callable[[torch.Tensor], torch.Tensor]


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    return precision


def make_infer(
    module: nn.Module, device: str, precision: str = "auto", process: bool = False, threads: int | None = None,
    cuda_graphs: bool = False, max_batch_size: int = 32, input_hw: tuple[int, int] = (256, 192),
) -> InferFn:
    """Build the infer callable of ``module`` on ``device`` (the module is copied off the CPU).

    ``process``: on CPU, the optimised engine runs in a child process (``ditepose.model.process_engine``)
    with ``threads`` torch threads (default 1). ``cuda_graphs``: on a CUDA device, one graph per
    batch bucket (powers of two up to ``max_batch_size``), all captured here at ``input_hw`` so
    that no request pays for a capture; ignored on CPU devices."""
    from ditepose.model.engine import InferenceEngine, buckets_up_to

    precision = resolve_precision(precision, device)
    if process and device.startswith("cpu"):
        from ditepose.model.process_engine import ProcessEngine

        return ProcessEngine(module, threads=threads or 1)
    if not device.startswith("cpu"):
        module = copy.deepcopy(module)
    if cuda_graphs and device.startswith("cuda"):
        engine = InferenceEngine(module, device, precision, cuda_graphs=True, batch_buckets=buckets_up_to(max_batch_size))
        engine.warmup(input_hw=input_hw)
        return engine
    return InferenceEngine(module, device, precision)


class BatcherInfer:
    """``infer(crops)`` through ``batcher`` as a background submission (blocks the calling thread)."""

    def __init__(self, batcher: DynamicBatcher, timeout_s: float) -> None:
        self.batcher = batcher
        self.timeout_s = timeout_s

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        return self.batcher.submit_sync(crops, self.timeout_s, background=True)
