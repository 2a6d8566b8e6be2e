"""ONNX export of Dite-HRNet.

The authors' dynamic kernels fold the batch into conv groups, which ONNX cannot express for a
symbolic batch; the export uses the optimised network in its 'stacked' dynamic mode (static
groups, attention-weighted sum over the N kernels), so one graph serves every batch size.
The file runs on :class:`~ditepose.model.engines.onnxruntime_engine.OnnxEngine`
(``build_engine(path, backend="onnxruntime")``); the accuracy gate that may refuse an export
lives with the evaluation (``ditepose.training.gate``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ditepose.model.dite_hrnet import TopDownPoseNet
from ditepose.model.engines.onnxruntime_engine import OnnxEngine
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


def max_abs_diff_vs_torch(module: TopDownPoseNet, onnx_path: str | Path, batch: torch.Tensor) -> float:
    """max |onnxruntime(batch) - module.eval()(batch)|: the export check the CLI prints."""
    with torch.inference_mode():
        expected = module.float().eval()(batch)
    return float((OnnxEngine(onnx_path)(batch) - expected).abs().max())
