"""bench/crops.py: run() gives a row per backend and person count, with the torch crops' error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from bench import crops
from tests.conftest import REPO_ROOT, subprocess_env


def test_run_on_cpu_times_both_backends_and_checks_equality() -> None:
    threads = cv2.getNumThreads()
    doc = crops.run("cpu", quick=True)
    assert cv2.getNumThreads() == threads  # the service-like 1 thread is undone afterwards
    rows = {(r["persons"], r["backend"]): r for r in doc["rows"]}
    assert set(rows) == {(p, b) for p in crops.PERSONS for b in ("cv2", "torch")}
    for row in rows.values():
        assert row["ms_per_image"] > 0 and row["min_ms"] <= row["ms_per_image"]
        assert row["crop_device"] == row["crops_end_on"] == "cpu"
        assert row["max_abs_diff_grey_levels"] <= 1
    assert all(rows[(p, "cv2")]["vs_cv2"] == 1.0 for p in crops.PERSONS)
    assert doc["machine"]["cores"] and doc["machine"]["cpu"] and "gpu" not in doc["machine"]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            crops.run("cuda", quick=True)


def test_cli_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "crops.json"
    cmd = [sys.executable, "-m", "bench.crops", "--quick", "--note", "test run", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["note"] == "test run" and len(doc["rows"]) == 2 * len(crops.PERSONS)
    assert "ms/image" in done.stdout and str(out) in done.stdout
