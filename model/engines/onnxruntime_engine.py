"""OnnxEngine (backend ``onnxruntime``): an ONNX heatmap model on onnxruntime's CPU provider.

Any ONNX file with input [N,3,H,W] and heatmap output serves, ours (``ditepose export onnx``)
or one converted elsewhere. A file exported with a fixed batch answers only that batch size, so
the engine pads and splits every other batch (:func:`~ditepose.model.engines.base.run_in_buckets`,
the same rule as a compiled torch engine's buckets).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditepose.model.engines.base import run_in_buckets


class OnnxEngine:
    """onnxruntime on CPU with the ``InferenceEngine`` interface: CPU float32 NCHW in, heatmaps out."""

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = self.session.get_inputs()[0].shape
        fixed = self.input_shape[0]
        # a symbolic batch axis is a name (str) or None; a fixed one an int
        self.buckets: tuple[int, ...] = (fixed,) if isinstance(fixed, int) else ()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an NCHW batch with 3 channels, got shape {tuple(batch.shape)}")
        return run_in_buckets(self._run, batch, self.buckets) if self.buckets else self._run(batch)

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().float().numpy())
        (out,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(out)

    def warmup(self, batch_sizes: list[int] | tuple[int, ...] | None = None,
               input_hw: tuple[int, int] = (256, 192)) -> float:
        """Run each batch size once (default: the fixed batch, else 1); returns seconds."""
        start = time.perf_counter()
        for size in batch_sizes or self.buckets or (1,):
            self(torch.zeros(size, 3, *input_hw))
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        return {"backend": "onnxruntime", "dynamic_batch": not self.buckets, "batch_buckets": list(self.buckets),
                "path": str(self.path), "device": "cpu", "precision": "fp32",
                "providers": self.session.get_providers()}
