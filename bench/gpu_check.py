"""The GPU machine's one prepared check: install, CUDA tests, engine, service, streams, training.

    make gpu-wheels      # here, once: what the GPU machine lacks, into .gpu/ (git-ignored; it travels)
    make gpu-check       # there, in one device call: python3 bench/gpu_check.py --out $OUT
    make gpu-check-dry   # here, on the CPU: the same stages end to end at toy sizes (part of the suite)

A GPU is lent rarely and briefly (about 15 minutes, 10 per command), so the time goes to running
this, not to setting anything up. The stages, each a child process with its own time limit inside
an overall budget (a stage that overruns is killed and reported, and the next one still runs):

- ``install``: the carried wheels (``.gpu/wheels``: FastAPI, pydantic, uvicorn, pycocotools, grpcio
  and their needs, cp312) and this project (``--no-deps``, so the machine's torch stays) into a
  target folder on ``PYTHONPATH``; prints the versions, the GPU and where ``ditepose`` came from;
- ``cuda_tests``: ``pytest -m cuda`` over the files that hold such tests (each runs on the CPU
  and on every CUDA device);
- ``engine``: ``bench/engine.py`` on CUDA: Dite-HRNet-18 at 256x192, batch 1, 64 and 256, fp32,
  fp16 and bf16, CUDA graphs on and off, against the eager model in the same run, peak memory;
- ``service``: ``bench/service.py``: REST ``/v1/pose`` on the GPU pool at concurrency 64 and 256
  (one person per 640x480 JPEG, flip test on) behind ``--api-processes``;
- ``stream``: ``bench/stream.py``: gRPC ``StreamPose`` streams on the GPU pool;
- ``train``: ``bench/train_throughput.py``: training images/s under AMP, and the data loader alone
  at N workers, on synthetic COCO-sized JPEGs.

It prints a table and writes, under ``--out`` (at most 8 files come back from a device call):
``gpu_check.json`` (versions, each stage's outcome and seconds, the issue's targets met or not),
``gpu_check.log`` (every stage's output), and the stages' own ``gpu_engine.json``,
``gpu_service.json``, ``gpu_stream.json``, ``gpu_train.json`` and ``gpu_cuda_tests.xml``.
``--dry`` runs every stage on the CPU at toy sizes, on this venv (no install), in under 3 minutes:
an untested GPU path is where the bugs are. Exit status: 0 when every stage ran to the end (the
targets are reported, not enforced: a figure below target is a finding, not a broken check).

Only the standard library is imported here: the parent must run before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CARRY = REPO_ROOT / ".gpu"  # git-ignored; name it in the device call's `carry`
WHEELS = CARRY / "wheels"
SHARED = CARRY / "shared"  # the ../shared files the checks read (../shared does not travel)
SHARED_FILES = ("fixtures/reference/README.md", "fixtures/reference/dite_hrnet_18_coco_golden_io.pt",
                "fixtures/reference/dite_hrnet_18_coco_random.pth", "fixtures/reference/dite_hrnet_30_mpii_golden_io.pt",
                "fixtures/reference/dite_hrnet_30_mpii_random.pth")
# What the GPU machine lacks (its image has torch, numpy, OpenCV, scipy, pillow, httpx, pytest, ...),
# pinned to what this venv runs. grpcio and protobuf travel too: the committed stubs check their versions.
WHEEL_PACKAGES = ("fastapi", "starlette", "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv",
                  "annotated-types", "typing-inspection", "typing-extensions", "python-multipart", "uvicorn",
                  "pycocotools", "grpcio", "grpcio-health-checking", "protobuf", "anyio", "h11")
CARRY_LIMIT_MB = 64  # the working tree and the carried paths together, per device call
DEMO_CHECKPOINT = REPO_ROOT / "model" / "weights" / "dite_hrnet_18_coco_demo.pth"
# The targets on one H200 (absolute figures hold only there).
TARGETS = {
    "engine_img_s_batch256_mixed": 10_000, "engine_speedup_batch64_mixed": 3.0,
    "service_req_s": 2_000, "service_p99_ms": 100.0, "train_img_s": 1_500,
}


@dataclass
class Stage:
    name: str
    argv: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    result_file: str | None = None  # the stage's own JSON/XML under the scratch folder


@dataclass
class Outcome:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    returncode: int | None
    tail: str


def _shared_dir(carried: bool = True) -> Path | None:
    """The ../shared files: carried (.gpu/shared) on the GPU machine, ../shared here (``carried``
    False: only the originals, the source of the carried copy)."""
    for candidate in ((SHARED,) if carried else ()) + (REPO_ROOT.parent / "shared", Path("/work/shared")):
        if (candidate / "fixtures" / "reference").is_dir():
            return candidate
    return None


def cuda_test_files() -> list[str]:
    """The test files with ``cuda``-marked tests: collecting only these keeps the suites that need
    what the GPU machine lacks (Celery, Selenium, Docker, ...) from failing the stage at import."""
    return sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())


def stages(dry: bool, python: str, scratch: Path, api_processes: int) -> list[Stage]:
    """The stage commands: full size on a GPU, toy size on the CPU with ``dry``."""
    shared = _shared_dir()
    reference = shared / "fixtures" / "reference" / "dite_hrnet_18_coco_random.pth" if shared else None
    versions = [python, "-c", VERSIONS_SCRIPT]
    tests = [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "--continue-on-collection-errors",
             f"--junitxml={scratch / 'gpu_cuda_tests.xml'}", *cuda_test_files()]
    engine = [python, "bench/engine.py", "--archs", "dite_hrnet_18", "--paths", "fast, ", "--no-onnx",
              "--streams", "1", "--json", str(scratch / "gpu_engine.json")]
    service = [python, "bench/service.py", "--flip", "--out", str(scratch / "gpu_service.json")]
    if api_processes > 1:
        service += ["--serve-arg=--api-processes", f"--serve-arg={api_processes}"]
    stream = [python, "-m", "bench.stream", "--flip", "--out", str(scratch / "gpu_stream.json")]
    train = [python, "bench/train_throughput.py", "--out", str(scratch / "gpu_train.json")]
    if dry:
        return [
            Stage("install", versions, 60),
            # the cheap half of the CUDA tests: the same collection, marker and report, on the CPU
            Stage("cuda_tests", [*tests, "-k", "not dite_hrnet_30 and not reference and not swaps"], 120),
            Stage("engine", [*engine, "--device", "cpu", "--batch-sizes", "1", "2", "--precisions", "fp16", "bf16",
                             "--rounds", "1", "--calls", "1", "--threads", "1"], 90, result_file="gpu_engine.json"),
            Stage("service", [*service, "--checkpoint", str(DEMO_CHECKPOINT), "--concurrency", "2", "4",
                              "--requests", "8", "--quick", "--max-batch-size", "8"], 120,
                  env={"DITEPOSE_DEVICES": "cpu"}, result_file="gpu_service.json"),
            Stage("stream", [*stream, "--devices", "cpu", "--checkpoint", str(DEMO_CHECKPOINT), "--streams", "1", "2",
                             "--frames", "6", "--batch-size", "4", "--engine-seconds", "0.5"], 90,
                  result_file="gpu_stream.json"),
            Stage("train", [*train, "--device", "cpu", "--amp", "bf16", "--batch-size", "4", "--steps", "1",
                            "--workers", "1", "--loader-workers", "1", "--loader-batches", "1",
                            "--input-size", "64x64"], 120, result_file="gpu_train.json"),
        ]
    workers = max(1, min(12, (os.cpu_count() or 2) - 4))
    return [
        Stage("install", versions, 30),
        Stage("cuda_tests", tests, 110),
        Stage("engine", [*engine, "--device", "cuda", "--batch-sizes", "1", "64", "256", "--rounds", "5"], 100,
              result_file="gpu_engine.json"),
        Stage("service", [*service, *(["--checkpoint", str(reference)] if reference else []),
                          "--concurrency", "64", "256", "--max-batch-size", "128"], 110,
              env={"DITEPOSE_DEVICES": "cuda:0", "DITEPOSE_CUDA_GRAPHS": "true"}, result_file="gpu_service.json"),
        Stage("stream", [*stream, "--devices", "cuda:0", "--streams", "1", "8", "--frames", "120",
                         "--batch-size", "64", "--max-in-flight", "8", "--engine-seconds", "3"], 45,
              result_file="gpu_stream.json"),
        Stage("train", [*train, "--device", "cuda", "--amp", "bf16", "--batch-size", "128", "--steps", "8",
                        "--workers", str(workers), "--loader-workers", str(workers), "4",
                        "--loader-batches", "4"], 85, result_file="gpu_train.json"),
    ]


VERSIONS_SCRIPT = r"""
import importlib, json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable}
for name in ("torch", "torchvision", "numpy", "cv2", "scipy", "fastapi", "pydantic", "uvicorn", "grpc",
             "google.protobuf", "pycocotools", "prometheus_client"):
    try:
        mod = importlib.import_module(name)
        out[name] = getattr(mod, "__version__", "present")
    except Exception as exc:
        out[name] = f"MISSING ({type(exc).__name__}: {exc})"
import torch
out["cuda"] = torch.version.cuda
out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
out["gpus"] = [dict(name=torch.cuda.get_device_name(i),
                    memory_gib=round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1))
               for i in range(torch.cuda.device_count())]
import ditepose
out["ditepose"] = ditepose.__version__
out["ditepose_from"] = ditepose.__file__
print("VERSIONS " + json.dumps(out))
missing = [k for k, v in out.items() if isinstance(v, str) and v.startswith("MISSING")]
sys.exit(f"missing: {missing}" if missing else 0)
"""


def install(site: Path, log: list[str]) -> None:
    """The carried wheels and the project into ``site`` (then on PYTHONPATH): no network there."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {WHEELS}: run `make gpu-wheels` here and carry .gpu")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site)]
    for argv in ([*pip, *map(str, wheels)], [*pip, "--no-build-isolation", str(REPO_ROOT)]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        log.append(f"$ {' '.join(argv[:12])} ...\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            raise SystemExit(f"pip install failed ({done.returncode}):\n{done.stderr[-3000:]}")


def run_stage(stage: Stage, env: dict[str, str], deadline: float, log: list[str]) -> Outcome:
    """One stage in its own process group (killed whole at its limit), output kept for the log."""
    budget = min(stage.timeout_s, deadline - time.monotonic())
    if budget < 5:
        return Outcome(stage.name, "skipped", 0.0, None, "no time left in the budget")
    started = time.monotonic()
    print(f"[gpu-check] {stage.name}: {' '.join(stage.argv[:6])} ... (limit {budget:.0f} s)", flush=True)
    proc = subprocess.Popen(stage.argv, cwd=REPO_ROOT, env={**env, **stage.env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=budget)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        # SIGABRT first: with PYTHONFAULTHANDLER set, a Python stage prints where every thread
        # hangs (the one clue a short device lease leaves), then the whole group goes
        os.kill(proc.pid, signal.SIGABRT)
        try:
            output, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            output = ""
        os.killpg(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate()
        output = (output or "") + (rest or "")
        status = "timeout"
    seconds = time.monotonic() - started
    log.append(f"===== {stage.name}: {status} after {seconds:.1f} s (exit {proc.returncode})\n$ "
               f"{' '.join(stage.argv)}\n{output}")
    print(output[-4000:], end="" if output.endswith("\n") else "\n", flush=True)
    return Outcome(stage.name, status, round(seconds, 1), proc.returncode, output[-1500:])


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_counts(path: Path) -> dict[str, int] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def targets(scratch: Path, dry: bool) -> dict[str, dict[str, Any]]:
    """Each target's measured figure and whether it is met (None: not measured; dry: not judged)."""
    found: dict[str, Any] = dict.fromkeys(TARGETS)
    engine = _read_json(scratch / "gpu_engine.json")
    if engine:
        rows = [r for r in engine["rows"] if "fp16" in r["path"] or "bf16" in r["path"]]
        big = [r["images_per_s"] for r in rows if r["batch"] == max(r2["batch"] for r2 in engine["rows"])]
        mid = [r["speedup_vs_eager"] for r in rows if r["batch"] == 64]
        found["engine_img_s_batch256_mixed"] = max(big) if big else None
        found["engine_speedup_batch64_mixed"] = max(mid) if mid else None
    service = _read_json(scratch / "gpu_service.json")
    if service and service.get("runs"):
        top = max(service["runs"][0]["levels"], key=lambda level: level["concurrency"])
        found["service_req_s"] = top["req_per_s"]
        found["service_p99_ms"] = top["p99_ms"]
        found["service_errors"] = sum(top["errors"].values())
    train = _read_json(scratch / "gpu_train.json")
    if train and train.get("training"):
        found["train_img_s"] = max(r["images_per_s"] for r in train["training"])
    out = {}
    for name, value in found.items():
        goal = TARGETS.get(name, 0)
        if value is None or dry:
            met = None
        elif name == "service_p99_ms":
            met = value < goal
        elif name == "service_errors":
            met = value == 0
        else:
            met = value >= goal
        out[name] = {"measured": value, "target": "0" if name == "service_errors" else
                     (f"< {goal}" if name == "service_p99_ms" else f">= {goal}"), "met": met}
    return out


def prepare() -> int:
    """``make gpu-wheels``: the cp312 wheels (the versions this venv runs) and the ../shared files into .gpu/."""
    from importlib import metadata

    WHEELS.mkdir(parents=True, exist_ok=True)
    for old in WHEELS.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={metadata.version(name)}" for name in WHEEL_PACKAGES]
    argv = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            "3.12", "--implementation", "cp", *(f"--platform={p}" for p in (
                "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                "manylinux1_x86_64")), "-d", str(WHEELS), *pins]
    subprocess.run(argv, check=True)
    source = _shared_dir(carried=False)
    if source is None:
        raise SystemExit("../shared/fixtures/reference is not here: the CUDA tests need it on the GPU machine")
    for rel in SHARED_FILES:
        (SHARED / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, SHARED / rel)
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                             capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((REPO_ROOT / p.decode()).stat().st_size for p in tracked if p and (REPO_ROOT / p.decode()).is_file())
    carried = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    total_mb = (tree + carried) / 2**20
    print(f"{len(pins)} wheels in {WHEELS}, {len(SHARED_FILES)} shared files in {SHARED}")
    print(f"travels: working tree {tree / 2**20:.1f} MiB + .gpu {carried / 2**20:.1f} MiB = {total_mb:.1f} MiB "
          f"(limit {CARRY_LIMIT_MB} MiB)")
    if total_mb > CARRY_LIMIT_MB:
        raise SystemExit("too much to travel: carry less")
    print('device call: run(command="make gpu-check", carry=[".gpu"], timeout_s=540)')
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="every stage on the CPU at toy sizes, on this venv")
    parser.add_argument("--prepare", action="store_true", help="fetch the wheels and shared files into .gpu/")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results",
                        help="where gpu_*.json and the log go ($OUT on the device machine)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="all stages together (default 470 on a GPU, under the device's 8-minute plan; 360 dry: "
                             "it takes ~100 s on an idle 2-core machine, the margin is for a loaded one)")
    parser.add_argument("--api-processes", type=int, default=None,
                        help="front-end processes of the service stage (default: cores // 3 on a GPU host, 2 dry)")
    parser.add_argument("--only", nargs="+", default=None, help="run just these stages (install always runs)")
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare()
    started = time.monotonic()
    deadline = started + (args.budget_s or (360.0 if args.dry else 470.0))
    args.out.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    shared = _shared_dir()
    if shared is not None:
        env["DITEPOSE_SHARED_DIR"] = str(shared)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        scratch = Path(tmp)
        outcomes: list[Outcome] = []
        if not args.dry:
            site = scratch / "site"
            try:
                install(site, log)
            except (SystemExit, subprocess.TimeoutExpired) as exc:
                outcomes.append(Outcome("pip", "failed", round(time.monotonic() - started, 1), None, str(exc)[-1500:]))
                print(f"[gpu-check] install failed: {exc}", flush=True)
            env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
            env["PATH"] = os.pathsep.join([str(site / "bin"), env.get("PATH", "")])
        api_processes = args.api_processes or (2 if args.dry else max(1, (os.cpu_count() or 3) // 3))
        versions: dict[str, Any] = {}
        for stage in [] if outcomes else stages(args.dry, sys.executable, scratch, api_processes):
            if args.only and stage.name != "install" and stage.name not in args.only:
                continue
            outcome = run_stage(stage, env, deadline, log)
            outcomes.append(outcome)
            if stage.name == "install":
                line = next((x for x in log[-1].splitlines() if x.startswith("VERSIONS ")), None)
                versions = json.loads(line[len("VERSIONS "):]) if line else {}
                if outcome.status != "ok":
                    break  # nothing else can run without the packages
        met = targets(scratch, args.dry)
        tests = junit_counts(scratch / "gpu_cuda_tests.xml")
        for name in ("gpu_engine.json", "gpu_service.json", "gpu_stream.json", "gpu_train.json",
                     "gpu_cuda_tests.xml"):
            if (scratch / name).exists():
                shutil.copyfile(scratch / name, args.out / name)
    gpus = versions.get("gpus") or []
    report = {
        "what": "bench/gpu_check.py" + (" --dry (CPU, toy sizes: the stages work; no figure here is a GPU's)"
                                        if args.dry else ": the GPU machine's prepared check"),
        "gpu": ", ".join(g["name"] for g in gpus) or None,
        "host": {"cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "versions": versions,
        "api_processes": api_processes,
        "stages": [o.__dict__ for o in outcomes],
        "cuda_tests": tests,
        "targets": met,
        "seconds": round(time.monotonic() - started, 1),
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_check.log").write_text("\n".join(log))
    print(f"\n{'stage':<12} {'status':<8} {'seconds':>8}   (GPU: {report['gpu'] or 'none, ' + platform.machine()})")
    for o in outcomes:
        print(f"{o.name:<12} {o.status:<8} {o.seconds:>8.1f}")
    if tests:
        print(f"cuda tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
              f"{tests['skipped']} skipped")
    print(f"\n{'target':<32} {'measured':>12} {'target':>10} {'met':>6}")
    for name, t in met.items():
        shown = "-" if t["measured"] is None else t["measured"]
        print(f"{name:<32} {shown!s:>12} {t['target']:>10} {'n/a' if t['met'] is None else t['met']!s:>6}")
    print(f"wrote {args.out / 'gpu_check.json'} ({report['seconds']} s)")
    return 0 if outcomes and all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
