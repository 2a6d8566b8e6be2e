"""The accuracy gate: a variant of a model (an ONNX file, an fp16/bf16, compiled or CUDA-graphed
engine) is scored against the PyTorch model on one set and refused when it falls short.

A conversion can lose accuracy without any error (a wrong channel order, a bad cast, a
quantiser): :func:`gate` runs the PyTorch model and the variant through the one evaluation loop
(:func:`ditepose.training.evaluate.predict` + ``score``) on the same crops, and
``ditepose export ... --gate`` refuses to publish what falls more than a margin below PyTorch.
It lives with the evaluation it runs; the model package only exports and runs engines.

The set is a data folder or a named dataset; names are looked up by the caller's ``lookup``
(the command line passes the service's evaluation catalogue), so training knows no service.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ditepose.model.checkpoint import CheckpointMeta
from ditepose.model.engines.agreement import AgreementReport, compare_heatmaps, per_joint_table
from ditepose.training.boxes import BoxSource, EvalSet, evaluation_set
from ditepose.training.data_layout import find_split
from ditepose.training.evaluate import pipeline_for, predict, primary_metric, score

InferFn = Callable[[torch.Tensor], torch.Tensor]

# How far a variant's metric may fall below PyTorch's before the gate refuses it, in the
# metric's own units: COCO AP is a fraction (0.005 = half an AP point), MPII PCKh a percentage.
DEFAULT_GATE_MARGINS = {"AP": 0.005, "PCKh": 0.5}


class DatasetFiles(Protocol):
    """A named evaluation set's files (the shape of the service catalogue's ``DatasetSpec``)."""

    @property
    def format(self) -> str: ...

    @property
    def ann_file(self) -> Path: ...

    @property
    def img_dir(self) -> Path: ...

    @property
    def gt_file(self) -> Path | None: ...


# name -> its files; raises LookupError (unknown name) or ValueError (a name that cannot be one)
DatasetLookup = Callable[[str], DatasetFiles]


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
    # per-joint keypoint agreement on those first crops (decoded, input pixels): what AP cannot judge on an
    # untrained checkpoint. Reported beside AP; the AP margin alone decides ``passed``.
    agreement: AgreementReport | None = None
    joint_names: tuple[str, ...] = ()

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
        if self.agreement is not None:
            lines.append(f"keypoint agreement on the first {self.agreement.crops} crops (pixels of the network input):")
            lines.append(per_joint_table(self.agreement, self.joint_names or None))
            lines.append(f"agreement {self.agreement.verdict()}")
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
            "agreement": self.agreement.to_dict() if self.agreement is not None else None,
        })


def resolve_gate_set(name: str, meta: CheckpointMeta, split: str = "val", max_images: int | None = None,
                     lookup: DatasetLookup | None = None) -> tuple[str, EvalSet]:
    """The set ``--gate`` names: a data folder (``ditepose evaluate --data`` layout, ``split``) or a
    dataset name ``lookup`` knows (the command line's: the evaluation catalogue,
    ``DITEPOSE_DATASETS`` and ``demo-synthetic``), with annotated person boxes, at the
    checkpoint's input size. Returns (a label for reports, the set)."""
    boxes = BoxSource("gt")  # the gate compares networks; a detector's boxes would be the same for both
    folder = Path(name)
    if folder.is_dir():
        layout = find_split(folder, meta.dataset, split)
        return f"{folder} ({split})", evaluation_set(meta.dataset, layout.ann_file, layout.img_dir, meta.input_size,
                                                     boxes, gt_file=layout.gt_file, max_images=max_images)
    if lookup is None:
        raise ValueError(f"--gate {name!r} is not a data folder")
    try:
        files = lookup(name)
    except (LookupError, ValueError) as exc:  # say that a folder was looked for too
        raise ValueError(f"--gate {name!r} is neither a data folder nor a catalogue dataset: {exc}") from None
    if files.format != meta.dataset:
        raise ValueError(f"--gate {name!r} is a {files.format} set; the checkpoint predicts {meta.dataset} joints")
    return name, evaluation_set(files.format, files.ann_file, files.img_dir, meta.input_size, boxes,
                                gt_file=files.gt_file, max_images=max_images)


def gate(
    reference: InferFn,
    candidate: InferFn,
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
        answers = [torch.as_tensor(candidate(crops)).to("cpu", torch.float32) for crops, _ in probes]
    diffs = [float((got - out).abs().max()) for got, (_, out) in zip(answers, probes, strict=True)]
    agreement = None
    if probes:
        crops_hw = (int(probes[0][0].shape[-2]), int(probes[0][0].shape[-1]))
        agreement = compare_heatmaps(torch.cat([out for _, out in probes]), torch.cat(answers), crops_hw,
                                     candidate_label)
    return GateReport(
        dataset=dataset_name, metric=metric, margin=margin, reference=dict(reference_table),
        candidate=dict(candidate_table), candidate_label=candidate_label, samples=len(dataset.records),
        flip=flip, variant=dict(variant or {}), max_heatmap_diff=max(diffs) if diffs else float("nan"),
        agreement=agreement, joint_names=tuple(dataset.spec.joint_names),
    )
