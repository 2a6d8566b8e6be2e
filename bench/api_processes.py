"""Today's layout (one API process) against ``--api-processes 2`` on the same machine.

Both layouts serve the same model with the same settings (REST only, one single-threaded
worker per core, max_batch_size 32); the second runs the inference host plus two front-end
processes. Both servers run at once, idle but for the one under load, and every concurrency
level is measured in rounds that alternate between them, so on a shared machine both see the
same background load. Two networks: ``null`` (a zero-cost forward pass,
:func:`bench.null_serve.zero_infer_factory`: the service's own per-request cost, i.e. what a GPU
host's front-ends face when inference is nearly free) and the shipped demo checkpoint (128x96,
real network on the CPU cores the front-ends also need). Requests are one person per 640x480
JPEG, flip test on (2 crops per request) unless ``--no-flip``, sent by :mod:`bench.loadgen`.

Reports req/s, p50/p99, errors, mean batch, and the CPU time per request of the whole server
(the host and every front-end). The machine and its load average (before and after) are
recorded: a figure taken on a loaded machine says so.

    python bench/api_processes.py            # writes bench/results/api_processes.json
    python bench/api_processes.py --quick    # fewer requests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.loadgen import LevelResult, pose_request, run_level  # noqa: E402
from bench.service import _metric_sums  # noqa: E402
from bench.service_support import ProcCpu, free_port, test_jpeg  # noqa: E402

OUT = REPO_ROOT / "bench" / "results" / "api_processes.json"


# ---------------------------------------------------------------- the server side (a child process)
def serve(processes: int, port: int, null_network: bool) -> None:
    """``ditepose serve`` with ``processes`` API processes, optionally over a zero-cost network."""
    from ditepose.service.core.settings import Settings
    from ditepose.service.server import run_servers

    settings = Settings(port=port, grpc_enabled=False, api_processes=processes)
    pool = None
    if null_network:
        from bench.null_serve import zero_infer_factory
        from ditepose.service.batching.pool import WorkerPool
        from ditepose.service.core.model_loader import load_models_isolated

        loaded, _ = load_models_isolated(settings.models)
        pool = WorkerPool(
            loaded, settings.resolved_devices(), max_batch_size=settings.max_batch_size,
            max_delay_ms=settings.max_delay_ms, queue_size=settings.queue_size,
            timeout_s=settings.request_timeout_s, infer_factory=zero_infer_factory,
            workers_per_device=settings.resolved_workers_per_device(), torch_threads=settings.resolved_torch_threads(),
        )
    run_servers(settings, pool)


# ---------------------------------------------------------------- the measuring side
def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def _tree(pid: int) -> list[int]:
    """``pid`` and its children (the front-ends of the multi-process layout)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return pids


def _tree_cpu_s(pid: int) -> float:
    total = 0.0
    for member in _tree(pid):
        try:
            total += ProcCpu(member).read()[0]
        except OSError:
            continue
    return total


class Server:
    def __init__(self, processes: int, checkpoint: Path, null_network: bool, max_batch: int) -> None:
        self.processes = processes
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT),
                   DITEPOSE_MODELS=json.dumps([{"name": "bench", "checkpoint": str(checkpoint)}]),
                   DITEPOSE_MAX_BATCH_SIZE=str(max_batch), DITEPOSE_QUEUE_SIZE="4096",
                   DITEPOSE_DEVICES=os.environ.get("DITEPOSE_DEVICES", "cpu"))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", str(processes), "--port", str(self.port)]
        if null_network:
            cmd.append("--null-network")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)

    def wait_ready(self, timeout_s: float = 300.0) -> Server:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
            try:
                front_ends = len(_tree(self.proc.pid)) - 1 if self.processes > 1 else 1
                if json.loads(_get(f"http://127.0.0.1:{self.port}/readyz")).get("ready") and \
                        front_ends >= self.processes:
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        raise RuntimeError("server did not become ready")

    def metrics(self) -> dict[str, float]:
        return _metric_sums(_get(f"http://127.0.0.1:{self.port}/metrics"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class Level:
    def __init__(self) -> None:
        self.run = LevelResult()
        self.cpu_s = 0.0
        self.delta: dict[str, float] = {}

    def add(self, server: Server, request: bytes, concurrency: int, requests: int) -> None:
        before, cpu = server.metrics(), _tree_cpu_s(server.proc.pid)
        self.run.merge(asyncio.run(run_level("127.0.0.1", server.port, request, concurrency, requests)))
        self.cpu_s += _tree_cpu_s(server.proc.pid) - cpu
        time.sleep(0.4)  # the host's batch observations reach the front-ends' /metrics every 0.25 s
        after = server.metrics()
        for key, value in after.items():
            self.delta[key] = self.delta.get(key, 0.0) + value - before[key]

    def summary(self, concurrency: int, requests: int) -> dict:
        ok = len(self.run.latencies_s)
        lat = sorted(x * 1000 for x in self.run.latencies_s)
        batches = self.delta.get("batch_size_count", 0.0)
        return {
            "concurrency": concurrency, "requests": requests, "ok": ok, "errors": self.run.errors,
            "req_per_s": round(ok / self.run.wall_s, 2) if self.run.wall_s else None,
            "p50_ms": round(statistics.median(lat), 1) if lat else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat else None,
            "mean_batch": round(self.delta["batch_size_sum"] / batches, 2) if batches else None,
            "server_cpu_ms_per_req": round(1000 * self.cpu_s / requests, 2),
        }


def bench_network(name: str, checkpoint: Path, null_network: bool, args: argparse.Namespace) -> dict:
    jpeg, box = test_jpeg()
    servers = [Server(n, checkpoint, null_network, args.max_batch_size) for n in (1, 2)]
    try:
        for server in servers:
            server.wait_ready()
        levels = []
        for concurrency in args.concurrency:
            requests = max(args.min_requests, args.per_connection * concurrency)
            per = {}
            for server in servers:  # warm-up, not counted
                request = pose_request("127.0.0.1", server.port, jpeg, [box], args.flip)
                asyncio.run(run_level("127.0.0.1", server.port, request, concurrency, 2 * concurrency))
                per[server.processes] = Level()
            for index in range(args.rounds):
                chunk = requests // args.rounds + (1 if index < requests % args.rounds else 0)
                order = servers if index % 2 == 0 else servers[::-1]
                for server in order:
                    request = pose_request("127.0.0.1", server.port, jpeg, [box], args.flip)
                    per[server.processes].add(server, request, concurrency, chunk)
            row = {f"api_processes_{n}": level.summary(concurrency, requests) for n, level in per.items()}
            one, two = row["api_processes_1"]["req_per_s"], row["api_processes_2"]["req_per_s"]
            row["speedup"] = round(two / one, 3) if one and two else None
            levels.append(row)
            _print_row(name, concurrency, row)
        return {"network": name, "checkpoint": str(checkpoint), "levels": levels}
    finally:
        for server in servers:
            server.stop()


def _print_row(network: str, concurrency: int, row: dict) -> None:
    cells = []
    for n in (1, 2):
        r = row[f"api_processes_{n}"]
        errors = sum(r["errors"].values())
        cells.append(f"{r['req_per_s']:>8} {r['p50_ms']:>7} {r['p99_ms']:>7} {errors:>4} {r['mean_batch']!s:>6} "
                     f"{r['server_cpu_ms_per_req']:>6}")
    print(f"{network:>6} {concurrency:>4} | " + " | ".join(cells) + f" | {row['speedup']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, metavar="N", help=argparse.SUPPRESS)  # the server child
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--null-network", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--networks", nargs="+", choices=("null", "demo"), default=["null", "demo"])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="flip test off (1 crop per request)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating chunks per level and layout")
    parser.add_argument("--note", default="", help="what else ran on the machine (recorded)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.port, args.null_network)
        return 0
    args.per_connection, args.min_requests = (4, 64) if args.quick else (10, 200)

    from ditepose import model

    demo = model.default_checkpoint_path()
    if demo is None:
        raise SystemExit("the demo checkpoint model/weights/dite_hrnet_18_coco_demo.pth is missing from this checkout (it ships in git)")
    print(f"{'net':>6} {'conc':>4} | {'1 process: req/s  p50  p99  err batch cpu/req':<46} | "
          f"{'2 API processes: same':<46} | speedup", flush=True)
    load_before = os.getloadavg()
    runs = [bench_network(name, Path(demo), name == "null", args) for name in args.networks]
    load_after = os.getloadavg()
    cores = os.cpu_count()
    result = {
        "what": "REST /v1/pose over loopback, one person per 640x480 JPEG: one API process (today's layout) vs "
        "--api-processes 2 (inference host + 2 front-ends), interleaved rounds",
        "machine": f"{platform.machine()}, {cores} CPU cores, "
        + (f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"),
        "devices": os.environ.get("DITEPOSE_DEVICES", "cpu"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "loaded": max(load_before[0], load_after[0]) > 0.5 * (cores or 1),
        "note": args.note,
        "flip_test": args.flip,
        "quick": args.quick,
        "client": "bench/loadgen.py (asyncio HTTP/1.1 keep-alive, prebuilt multipart request), on the same cores",
        "server_cpu": "CPU seconds of the server process and its children (host + front-ends) per request",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "max_batch_size": args.max_batch_size,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average before {result['load_average_before']}, after {result['load_average_after']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
