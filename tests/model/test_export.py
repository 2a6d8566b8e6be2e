"""ONNX export: one graph for every batch size, onnxruntime within 2e-3 of the authors' fp64 outputs."""

from __future__ import annotations

import subprocess

import pytest
import torch

from ditepose.model.engines.onnxruntime_engine import OnnxEngine
from tests.conftest import REPO_ROOT, python_cmd, subprocess_env

CKPT = "dite_hrnet_18_coco_random.pth"
GOLDEN = "dite_hrnet_18_coco_golden_io.pt"


@pytest.fixture(scope="module")
def exported(reference_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "d18.onnx"
    proc = subprocess.run(
        python_cmd("export", "onnx", str(reference_dir / CKPT), "--out", str(out), "--dynamic-batch"),
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "dynamic" in proc.stdout
    return out


@pytest.mark.slow  # the export fixture takes ~15-30 s on 2 cores
def test_onnxruntime_matches_fp64_reference_at_any_batch(exported, reference_dir):
    golden = torch.load(reference_dir / GOLDEN, weights_only=True)
    engine = OnnxEngine(exported)
    assert engine.describe()["dynamic_batch"] is True
    expected = golden["heatmaps_eval_fp64"]
    assert (engine(golden["input"]).double() - expected).abs().max().item() < 2e-3
    assert (engine(golden["input"][1:]).double() - expected[1:]).abs().max().item() < 2e-3
    batch = torch.cat([golden["input"], golden["input"][:1]])
    out = engine(batch)
    assert out.shape == (3, 17, 64, 48)
    assert (out.double() - torch.cat([expected, expected[:1]])).abs().max().item() < 2e-3


@pytest.mark.slow
def test_onnx_engine_rejects_bad_input(exported):
    engine = OnnxEngine(exported)
    with pytest.raises(ValueError, match="NCHW"):
        engine(torch.zeros(1, 1, 256, 192))


def test_export_cli_errors_are_clear(tmp_path):
    proc = subprocess.run(
        python_cmd("export", "onnx", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "m.onnx")),
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "neither a checkpoint file nor an arch" in proc.stderr
    proc = subprocess.run(
        python_cmd("export", "onnx", "dite_hrnet_18", "--out", str(tmp_path / "m.onnx"), "--plain",
                   "--dynamic-batch"),
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "fixed batch" in proc.stderr
