"""The accuracy gate (training.gate): its verdict, its report, and how it finds its set without the service.

The CLI-level tests (a faithful export published, a broken one refused, engines gated) are in
tests/model/test_export_gate.py; these run the gate itself on a small synthetic COCO set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ditepose.model import build_model
from ditepose.model.checkpoint import CheckpointMeta
from ditepose.model.pipeline import module_infer
from ditepose.training.gate import DEFAULT_GATE_MARGINS, GateReport, gate, resolve_gate_set
from tests.training.conftest import TINY

META = CheckpointMeta(arch="dite_hrnet_18", dataset="coco", num_joints=17, input_size=(64, 64))


@dataclass(frozen=True)
class Files:
    """What a catalogue lookup answers (the shape of the service's DatasetSpec)."""

    format: str
    ann_file: Path
    img_dir: Path
    gt_file: Path | None = None


@pytest.fixture(scope="module")
def synthetic_coco(tmp_path_factory: pytest.TempPathFactory) -> Files:
    from ditepose.training.synth import synthesize

    out = tmp_path_factory.mktemp("gate-set")
    ann_file = synthesize("coco", out, 2, seed=3, split="val")
    return Files("coco", ann_file, out / "val")


def _report(reference: float, candidate: float) -> GateReport:
    return GateReport(dataset="d", metric="AP", margin=0.005, reference={"AP": reference, "AR": 0.5},
                      candidate={"AP": candidate, "AR": 0.5}, candidate_label="onnxruntime", samples=3, flip=True)


def test_the_verdict_follows_the_margin_and_nan_never_passes() -> None:
    assert _report(0.30, 0.296).passed and "passed" in _report(0.30, 0.296).verdict()
    refused = _report(0.30, 0.20)
    assert not refused.passed and refused.drop == pytest.approx(0.10)
    assert "refused: onnxruntime AP 0.2000 is 0.1000 below PyTorch's 0.3000" in refused.verdict()
    assert not _report(0.30, math.nan).passed
    data = _report(math.nan, 0.1).to_dict()
    assert data["pytorch"]["AP"] is None and data["passed"] is False  # JSON-ready: NaN -> null
    assert DEFAULT_GATE_MARGINS == {"AP": 0.005, "PCKh": 0.5}


def test_a_name_is_resolved_by_the_lookup_it_is_given(synthetic_coco: Files) -> None:
    looked_up: list[str] = []

    def lookup(name: str) -> Files:
        looked_up.append(name)
        return synthetic_coco

    name, eval_set = resolve_gate_set("val-set", META, lookup=lookup)
    assert name == "val-set" and looked_up == ["val-set"] and len(eval_set.dataset.records) > 0
    assert eval_set.dataset.input_size_wh == (64, 64)


def test_a_name_no_lookup_knows_is_refused_clearly(synthetic_coco: Files) -> None:
    def unknown(name: str) -> Files:
        raise LookupError(f"unknown dataset {name!r}")

    with pytest.raises(ValueError, match="neither a data folder nor a catalogue dataset: unknown dataset 'x'"):
        resolve_gate_set("x", META, lookup=unknown)
    with pytest.raises(ValueError, match="'x' is not a data folder"):
        resolve_gate_set("x", META)
    mpii = Files("mpii", synthetic_coco.ann_file, synthetic_coco.img_dir)
    with pytest.raises(ValueError, match="is a mpii set; the checkpoint predicts coco joints"):
        resolve_gate_set("x", META, lookup=lambda _: mpii)


def test_a_variant_equal_to_pytorch_passes_with_no_drop(synthetic_coco: Files) -> None:
    torch.manual_seed(0)
    module = build_model("dite_hrnet_18", **TINY).eval()
    name, eval_set = resolve_gate_set("val-set", META, lookup=lambda _: synthetic_coco)
    reference = module_infer(module)
    same = gate(reference, reference, eval_set, name, flip=False)
    assert same.passed and same.drop == 0 and same.max_heatmap_diff == 0.0
    assert same.samples == len(eval_set.dataset.records)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        gate(reference, reference, eval_set, name, margin=-1.0)
