"""bench/gpu_check.py: the GPU machine's prepared check, run end to end here on the CPU (``--dry``).

The dry run is the same script, stages and result files at toy sizes: what breaks here would
break there, where the time to fix it is minutes. The GPU plan itself is checked for covering
what the check must measure (batch sizes, precisions, concurrency levels, AMP).
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_check

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = ["install", "cuda_tests", "engine", "service", "stream", "train"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-check-dry")
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry", "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=480)
    return out, done


def test_dry_run_runs_every_stage_and_writes_every_file(dry_run: tuple) -> None:
    out, done = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == STAGES, done.stdout[-3000:]
    failed = {n: s["tail"][-800:] for n, s in stages.items() if s["status"] != "ok"}
    assert not failed and done.returncode == 0, failed
    print(f"\ndry run: {report['seconds']} s; " + ", ".join(f"{n} {s['seconds']} s" for n, s in stages.items()))
    assert report["versions"]["torch"] and report["versions"]["ditepose_from"].endswith("__init__.py")
    assert report["gpu"] is None  # nothing here claims to be a GPU figure
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gpu_check.json", "gpu_check.log", "gpu_cuda_tests.xml", "gpu_engine.json",
                     "gpu_service.json", "gpu_stream.json", "gpu_train.json"]
    assert len(names) <= 8  # what a device call brings back
    assert "target" in done.stdout and "cuda tests:" in done.stdout


def test_dry_run_stage_results_hold_their_figures(dry_run: tuple) -> None:
    out, _done = dry_run
    tests = json.loads((out / "gpu_check.json").read_text())["cuda_tests"]
    assert tests["tests"] > 0 and tests["failures"] == 0 and tests["errors"] == 0
    engine = json.loads((out / "gpu_engine.json").read_text())
    paths = {r["path"] for r in engine["rows"]}
    assert {"fast, fp16", "fast, bf16"} <= paths and any("eager" in p for p in paths)
    assert {r["batch"] for r in engine["rows"]} == {1, 2}
    service = json.loads((out / "gpu_service.json").read_text())
    levels = service["runs"][0]["levels"]
    assert [lv["concurrency"] for lv in levels] == [2, 4] and service["flip_test"]
    assert all(lv["ok"] == lv["requests"] and not sum(lv["errors"].values()) for lv in levels), levels
    assert service["serve_args"] == ["--api-processes", "2"]
    stream = json.loads((out / "gpu_stream.json").read_text())
    assert [r["streams"] for r in stream["streams"]] == [1, 2] and all(r["frames"] > 0 for r in stream["streams"])
    train = json.loads((out / "gpu_train.json").read_text())
    assert train["amp"] == "bf16" and train["training"][0]["images_per_s"] > 0
    targets = json.loads((out / "gpu_check.json").read_text())["targets"]
    assert set(gpu_check.TARGETS) <= set(targets)
    assert all(t["met"] is None for t in targets.values())  # a CPU run judges no GPU target
    assert targets["engine_img_s_batch256_mixed"]["measured"] > 0 and targets["train_img_s"]["measured"] > 0


def test_the_gpu_plan_measures_what_the_check_must(tmp_path: Path) -> None:
    plan = {s.name: s for s in gpu_check.stages(dry=False, python="python3", scratch=tmp_path, api_processes=5)}
    assert list(plan) == STAGES
    engine = " ".join(plan["engine"].argv)
    assert "--device cuda" in engine and "--batch-sizes 1 64 256" in engine and "--precisions" not in engine
    service = " ".join(plan["service"].argv)
    assert "--concurrency 64 256" in service and "--flip" in service and "--api-processes --serve-arg=5" in service
    assert plan["service"].env["DITEPOSE_DEVICES"] == "cuda:0"
    assert "--amp bf16" in " ".join(plan["train"].argv) and "--device cuda" in " ".join(plan["train"].argv)
    assert plan["cuda_tests"].argv[3:6] == ["-q", "-m", "cuda"] and "-k" not in plan["cuda_tests"].argv
    files = [a for a in plan["cuda_tests"].argv if a.startswith("tests/")]
    assert {"tests/model/test_engine_cuda.py", "tests/service/batching/test_out_of_memory.py"} <= set(files)
    assert not any("jobs" in f or "deploy/test_compose" in f for f in files)  # Celery, Docker: not there
    assert sum(s.timeout_s for s in plan.values()) <= 8 * 60  # the 8 minutes for the whole check


def test_a_stage_past_its_limit_is_killed_with_its_children(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(marker)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    log: list[str] = []
    started = time.monotonic()
    outcome = gpu_check.run_stage(gpu_check.Stage("slow", [sys.executable, "-c", script], 6), {},
                                  time.monotonic() + 60, log)
    assert outcome.status == "timeout" and time.monotonic() - started < 30
    assert "started" in outcome.tail and "slow: timeout" in log[0]
    child = int(marker.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    skipped = gpu_check.run_stage(gpu_check.Stage("late", ["true"], 30), {}, time.monotonic() + 1, log)
    assert skipped.status == "skipped"


def test_targets_are_judged_from_the_stage_files(tmp_path: Path) -> None:
    rows = [{"path": "eager (authors' graph)", "batch": 64, "images_per_s": 900, "speedup_vs_eager": 1.0},
            {"path": "fast, fp16, graphs", "batch": 64, "images_per_s": 4000, "speedup_vs_eager": 4.4},
            {"path": "fast, bf16", "batch": 256, "images_per_s": 12000, "speedup_vs_eager": 5.0},
            {"path": "fast, fp32", "batch": 256, "images_per_s": 20000, "speedup_vs_eager": 9.0}]
    (tmp_path / "gpu_engine.json").write_text(json.dumps({"rows": rows}))
    levels = [{"concurrency": 64, "req_per_s": 2500, "p99_ms": 20, "errors": {}},
              {"concurrency": 256, "req_per_s": 1800, "p99_ms": 140, "errors": {"503": 2}}]
    (tmp_path / "gpu_service.json").write_text(json.dumps({"runs": [{"levels": levels}]}))
    (tmp_path / "gpu_train.json").write_text(json.dumps({"training": [{"images_per_s": 1600}]}))
    met = gpu_check.targets(tmp_path, dry=False)
    assert met["engine_img_s_batch256_mixed"] == {"measured": 12000, "target": ">= 10000", "met": True}  # fp32 ignored
    assert met["engine_speedup_batch64_mixed"]["met"] is True
    assert met["service_req_s"]["met"] is False and met["service_p99_ms"]["met"] is False  # the top level counts
    assert met["service_errors"] == {"measured": 2, "target": "0", "met": False}
    assert met["train_img_s"]["met"] is True
    assert all(t["met"] is None for t in gpu_check.targets(tmp_path / "missing", dry=False).values())


def test_gpu_wheels_carry_no_cpu_inference_runtime() -> None:
    """What ``make gpu-wheels`` carries to the GPU machine gains no OpenVINO or ONNX wheels (issue 26): the GPU
    path serves the torch engine, and the carried folder has a 64 MiB limit. The wheels are fetched with
    ``--no-deps``, so the listed packages are all that travel besides this project."""
    runtimes = [name for name in gpu_check.WHEEL_PACKAGES if name.startswith(("openvino", "onnx"))]
    assert not runtimes, runtimes
    assert '"--no-deps"' in inspect.getsource(gpu_check.prepare)  # no dependency rides along unlisted
