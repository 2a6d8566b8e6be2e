"""ONNX export of Dite-HRNet, and an onnxruntime engine with the ``InferenceEngine`` call interface.

The authors' dynamic kernels fold the batch into conv groups, which ONNX cannot express for a
symbolic batch; the export uses the optimised network in its 'stacked' dynamic mode (static
groups, attention-weighted sum over the N kernels), so one graph serves every batch size.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ditepose.model.dite_hrnet import TopDownPoseNet
from ditepose.model.optimize import optimize_for_inference

OPSET = 17


def export_onnx(
    module: TopDownPoseNet,
    path: str | Path,
    input_hw: tuple[int, int] = (256, 192),
    dynamic_batch: bool = True,
    optimized: bool = True,
    batch: int = 1,
) -> Path:
    """Write ``module`` (eval-mode function) as ONNX: input ``images`` [N,3,H,W], output ``heatmaps``.

    ``batch`` is the fixed batch size when ``dynamic_batch`` is off. The plain (unoptimised)
    network exports only with a fixed batch: its batch-as-groups conv needs a static group count.
    """
    if optimized is False and dynamic_batch:
        raise ValueError("the plain network exports with a fixed batch only (use the optimised one)")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    height, width = input_hw
    module.check_input_size(height, width)
    net: nn.Module = optimize_for_inference(module, dynamic="stacked") if optimized else module
    net = net.float().cpu().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2 if dynamic_batch else batch, 3, height, width)
    # the traced shape checks are on spatial sizes, which an export fixes: constants are right
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["heatmaps"],
            dynamic_axes={"images": {0: "batch"}, "heatmaps": {0: "batch"}} if dynamic_batch else None,
            opset_version=OPSET,
            dynamo=False,
        )
    return path


class OnnxEngine:
    """onnxruntime on CPU with the ``InferenceEngine`` interface: CPU float32 NCHW in, heatmaps out."""

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = self.session.get_inputs()[0].shape

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an NCHW batch with 3 channels, got shape {tuple(batch.shape)}")
        fixed = self.input_shape[0]
        if isinstance(fixed, int) and fixed != batch.shape[0]:
            raise ValueError(f"this ONNX model was exported for batch {fixed}, got {batch.shape[0]}")
        array = np.ascontiguousarray(batch.detach().cpu().float().numpy())
        (out,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(out)

    def warmup(self, batch_sizes: list[int], input_hw: tuple[int, int] = (256, 192)) -> float:
        start = time.perf_counter()
        for size in batch_sizes:
            self(torch.zeros(size, 3, *input_hw))
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        return {"backend": "onnxruntime", "dynamic_batch": not isinstance(self.input_shape[0], int), "path": str(self.path), "device": "cpu", "precision": "fp32",
                "providers": self.session.get_providers()}


def max_abs_diff_vs_torch(module: TopDownPoseNet, onnx_path: str | Path, batch: torch.Tensor) -> float:
    """max |onnxruntime(batch) - module.eval()(batch)|: the export check the CLI prints."""
    with torch.inference_mode():
        expected = module.float().eval()(batch)
    return float((OnnxEngine(onnx_path)(batch) - expected).abs().max())
