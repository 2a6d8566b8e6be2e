"""Turning a served model into ``infer(batch) -> heatmaps`` for one device.

The worker pool only needs a callable; this factory picks the project's optimised
``model.engine.InferenceEngine`` when it is available and otherwise runs the plain module
under ``torch.inference_mode``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

InferFn = Callable[[torch.Tensor], torch.Tensor]


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    return precision


class TorchInfer:
    """Eager forward pass of a module on one device; returns fp32 CPU heatmaps."""

    def __init__(self, module: nn.Module, device: str, precision: str = "fp32") -> None:
        self.device = torch.device(device)
        self.precision = precision
        self.module = module.to(self.device).eval()
        self._dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            batch = batch.to(self.device, non_blocking=True)
            if self._dtype is not None:
                with torch.autocast(self.device.type, dtype=self._dtype):
                    out = self.module(batch)
            else:
                out = self.module(batch)
            return out.float().cpu()


def make_infer(
    module: nn.Module, device: str, precision: str = "auto", process: bool = False, threads: int | None = None
) -> InferFn:
    """Build the infer callable of ``module`` on ``device`` (the module is copied off the CPU).

    ``process``: on CPU, the optimised engine runs in a child process (``model.process_engine``)
    with ``threads`` torch threads (default 1)."""
    precision = resolve_precision(precision, device)
    if process and device.startswith("cpu"):
        from ditepose.model.process_engine import ProcessEngine

        return ProcessEngine(module, threads=threads or 1)
    if not device.startswith("cpu"):
        module = copy.deepcopy(module)
    try:
        from ditepose.model.engine import InferenceEngine
    except ImportError:
        return TorchInfer(module, device, precision)
    return InferenceEngine(module, device, precision)
