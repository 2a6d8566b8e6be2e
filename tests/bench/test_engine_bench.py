"""bench/engine.py runs end to end (smallest settings) and writes the rows it prints."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT, subprocess_env


def test_engine_bench_writes_a_row_per_path(tmp_path):
    out = tmp_path / "engine.json"
    cmd = [sys.executable, "bench/engine.py", "--archs", "dite_hrnet_18", "--batch-sizes", "1", "--rounds", "1", "--calls", "2",
           "--no-onnx", "--streams", "2", "--paths", "fast dyn, CL", "processes", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {row["path"]: row for row in result["rows"]}
    assert set(rows) == {"eager (authors' graph)", "fused, fast dyn, CL", "fast CL, 2 processes x 1 thread"}
    assert rows["eager (authors' graph)"]["speedup_vs_eager"] == 1.0
    assert rows["fast CL, 2 processes x 1 thread"]["streams"] == 2
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["cpu_ms_per_batch"] > 0  # children's CPU counted too
        assert row["path"] in done.stdout
