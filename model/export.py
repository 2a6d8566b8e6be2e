"""ONNX export of Dite-HRNet, an onnxruntime engine with the ``InferenceEngine`` call interface,
and the accuracy gate every export and engine variant can be put through.

The authors' dynamic kernels fold the batch into conv groups, which ONNX cannot express for a
symbolic batch; the export uses the optimised network in its 'stacked' dynamic mode (static
groups, attention-weighted sum over the N kernels), so one graph serves every batch size.

A conversion can lose accuracy without any error (a wrong channel order, a bad cast, a
quantiser): :func:`gate` runs the PyTorch model and a variant (an ONNX file, an fp16/bf16,
compiled or CUDA-graphed engine) through the one evaluation loop
(:func:`ditepose.training.evaluate.predict` + ``score``) on the same crops, and
``ditepose export ... --gate`` refuses to publish what falls more than a margin below PyTorch.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ditepose.model.dite_hrnet import TopDownPoseNet
from ditepose.model.optimize import optimize_for_inference

if TYPE_CHECKING:
    from ditepose.model.checkpoint import CheckpointMeta
    from ditepose.training.boxes import EvalSet

OPSET = 17
# How far a variant's metric may fall below PyTorch's before the gate refuses it, in the
# metric's own units: COCO AP is a fraction (0.005 = half an AP point), MPII PCKh a percentage.
DEFAULT_GATE_MARGINS = {"AP": 0.005, "PCKh": 0.5}


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


class FixedBatchInfer:
    """An ``infer`` callable over an engine of one fixed batch size: pads (zeros) and splits.

    A fixed-batch ONNX file (the default export) answers only its own batch; the evaluation loop
    sends whatever is left at the end of a chunk. Padded rows are computed and dropped."""

    def __init__(self, engine: Callable[[torch.Tensor], torch.Tensor], batch: int) -> None:
        self.engine, self.batch = engine, batch

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, len(crops), self.batch):
            part = crops[start : start + self.batch]
            size = len(part)
            if size < self.batch:
                part = torch.cat([part, part.new_zeros(self.batch - size, *part.shape[1:])])
            parts.append(self.engine(part)[:size])
        return torch.cat(parts)


def onnx_infer(path: str | Path, num_threads: int | None = None) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                          dict[str, Any]]:
    """An ``infer`` callable for any ONNX heatmap model (ours or converted elsewhere) and its description."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    engine = OnnxEngine(path, num_threads=num_threads)
    fixed = engine.input_shape[0]
    infer = FixedBatchInfer(engine, fixed) if isinstance(fixed, int) else engine
    return infer, {**engine.describe(), "label": "onnxruntime"}


def engine_infer(module: TopDownPoseNet, device: str = "cpu", precision: str = "fp32", compile: bool = False,
                 cuda_graphs: bool = False, fuse_bn: bool = True) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                           dict[str, Any]]:
    """The serving engine in one configuration, as an ``infer`` callable and its description.

    The engine refuses what the device cannot do (fp16/bf16 and CUDA graphs need CUDA) before
    any evaluation starts."""
    from ditepose.model.engine import InferenceEngine

    engine = InferenceEngine(module, device=device, precision=precision, fuse_bn=fuse_bn, compile=compile,
                             cuda_graphs=cuda_graphs)
    switches = [precision] + [name for name, on in (("compiled", compile), ("cuda-graphs", cuda_graphs)) if on]
    return engine, {**engine.describe(), "label": f"engine {'+'.join(switches)} on {engine.device}"}


@dataclass
class GateReport:
    """PyTorch's and a variant's metric tables on one set, and whether the variant may be published."""

    dataset: str
    metric: str  # the primary metric compared: "AP" (COCO) or "PCKh" (MPII)
    margin: float
    reference: dict[str, float]  # the PyTorch model's table
    candidate: dict[str, float]  # the variant's table
    candidate_label: str
    samples: int
    flip: bool
    variant: dict[str, Any] = field(default_factory=dict)
    max_heatmap_diff: float = float("nan")  # max |variant - PyTorch| over the first crops of the set

    @property
    def drop(self) -> float:
        """How far the variant is below PyTorch (negative: above)."""
        return self.reference[self.metric] - self.candidate[self.metric]

    @property
    def passed(self) -> bool:
        """Within the margin; a NaN metric (nothing scored) never passes."""
        value, ref = self.candidate[self.metric], self.reference[self.metric]
        return not (math.isnan(value) or math.isnan(ref)) and self.drop <= self.margin + 1e-12

    def verdict(self) -> str:
        m = self.metric
        ref, got = self.reference[m], self.candidate[m]
        if self.passed:
            return (f"passed: {self.candidate_label} {m} {got:.4f} vs PyTorch {ref:.4f} "
                    f"(drop {self.drop:+.4f}, margin {self.margin:g})")
        return (f"refused: {self.candidate_label} {m} {got:.4f} is {self.drop:.4f} below PyTorch's {ref:.4f} "
                f"on {self.dataset} (margin {self.margin:g})")

    def table(self) -> str:
        """Both tables side by side, the compared metric first."""
        keys = [self.metric, *(k for k in self.reference if k != self.metric)]
        width = max(len(k) for k in keys) + 2
        label = self.candidate_label
        lines = [f"gate on {self.dataset}: {self.samples} people, annotated boxes, "
                 f"flip test {'on' if self.flip else 'off'}",
                 f"{'':<{width}}{'PyTorch':>10}  {label:>{max(10, len(label))}}  {'drop':>8}"]
        for k in keys:
            ref, got = self.reference[k], self.candidate.get(k, float("nan"))
            lines.append(f"{k:<{width}}{ref:>10.4f}  {got:>{max(10, len(label))}.4f}  {ref - got:>+8.4f}")
        lines.append(f"max |heatmap difference| on the first crops: {self.max_heatmap_diff:.3g}")
        lines.append(self.verdict())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN (a metric with nothing to score) becomes null."""

        def clean(value: Any) -> Any:
            if isinstance(value, float):
                return value if math.isfinite(value) else None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [clean(v) for v in value]
            return value

        return clean({
            "dataset": self.dataset, "metric": self.metric, "margin": self.margin, "passed": self.passed,
            "drop": self.drop, "pytorch": self.reference, "candidate": self.candidate,
            "candidate_label": self.candidate_label, "samples": self.samples, "flip": self.flip,
            "max_heatmap_diff": self.max_heatmap_diff, "variant": self.variant,
        })


def resolve_gate_set(name: str, meta: CheckpointMeta, split: str = "val",
                     max_images: int | None = None) -> tuple[str, EvalSet]:
    """The set ``--gate`` names: a data folder (``ditepose evaluate --data`` layout, ``split``) or a
    dataset name of the evaluation catalogue (``DITEPOSE_DATASETS``, ``demo-synthetic``), with
    annotated person boxes, at the checkpoint's input size."""
    from ditepose.training.boxes import BoxSource, evaluation_set
    from ditepose.training.data_layout import find_split

    boxes = BoxSource("gt")  # the gate compares networks; a detector's boxes would be the same for both
    folder = Path(name)
    if folder.is_dir():
        layout = find_split(folder, meta.dataset, split)
        label = f"{folder} ({split})"
        eval_set = evaluation_set(meta.dataset, layout.ann_file, layout.img_dir, meta.input_size, boxes,
                                  gt_file=layout.gt_file, max_images=max_images)
    else:
        from ditepose.service.core.settings import Settings
        from ditepose.service.jobs.catalogue import BadName, Catalogue, UnknownName

        try:
            spec = Catalogue.from_settings(Settings()).dataset(name).spec
        except (UnknownName, BadName) as exc:  # say that a folder was looked for too
            raise ValueError(f"--gate {name!r} is neither a data folder nor a catalogue dataset: {exc}") from None
        if spec.format != meta.dataset:
            raise ValueError(f"--gate {name!r} is a {spec.format} set; the checkpoint predicts {meta.dataset} "
                             "joints")
        label = name
        eval_set = evaluation_set(spec.format, spec.ann_file, spec.img_dir, meta.input_size, boxes,
                                  gt_file=spec.gt_file, max_images=max_images)
    scored = getattr(eval_set.dataset, "eval_image_ids", None)
    if scored is not None:  # only the scored images' people need predicting
        keep = set(scored)
        eval_set.dataset.records = [r for r in eval_set.dataset.records if r["image_id"] in keep]
    return label, eval_set


def gate(
    reference: Callable[[torch.Tensor], torch.Tensor],
    candidate: Callable[[torch.Tensor], torch.Tensor],
    eval_set: EvalSet,
    dataset_name: str,
    *,
    candidate_label: str = "export",
    variant: dict[str, Any] | None = None,
    margin: float | None = None,
    flip: bool = True,
    batch_size: int = 32,
    probe_crops: int = 64,
) -> GateReport:
    """Score ``reference`` (the PyTorch model) and ``candidate`` on the same crops of ``eval_set``.

    Both go through :func:`ditepose.training.evaluate.predict` and ``score``, the loop of
    ``ditepose evaluate``, the trainer and the jobs, with the same pipeline (same crops, same
    decoder). The heatmap difference is measured on the first ``probe_crops`` crops only, so the
    gate's memory does not grow with the set."""
    from ditepose.training.evaluate import pipeline_for, predict, primary_metric, score

    dataset = eval_set.dataset
    metric = primary_metric(dataset)
    margin = DEFAULT_GATE_MARGINS[metric] if margin is None else float(margin)
    if not margin >= 0:
        raise ValueError(f"the gate margin must be >= 0, got {margin}")
    if not dataset.records:
        raise ValueError(f"the gate set {dataset_name!r} has no people to score")
    probes: list[tuple[torch.Tensor, torch.Tensor]] = []  # the first batches' crops and PyTorch heatmaps

    def reference_infer(crops: torch.Tensor) -> torch.Tensor:
        out = torch.as_tensor(reference(crops)).to("cpu", torch.float32)
        if sum(len(c) for c, _ in probes) < probe_crops:
            probes.append((crops.clone(), out.clone()))
        return out

    pipeline = pipeline_for(dataset, flip_test=flip)
    reference_table = score(dataset, predict(reference_infer, dataset, pipeline, batch_size), eval_set.gt_file)
    candidate_table = score(dataset, predict(candidate, dataset, pipeline, batch_size), eval_set.gt_file)
    with torch.inference_mode():
        diffs = [float((torch.as_tensor(candidate(crops)).to("cpu", torch.float32) - out).abs().max())
                 for crops, out in probes]
    return GateReport(
        dataset=dataset_name, metric=metric, margin=margin, reference=dict(reference_table),
        candidate=dict(candidate_table), candidate_label=candidate_label, samples=len(dataset.records),
        flip=flip, variant=dict(variant or {}), max_heatmap_diff=max(diffs) if diffs else float("nan"),
    )
