"""Loopback load test of the REST service, against the engine's own throughput.

Starts ``ditepose serve`` as a subprocess and sends one-person 640x480 JPEGs at a fixed
concurrency (a bounded number of requests per level, after an uncounted warm-up round) with
the low-CPU client of :mod:`bench.loadgen`; reports req/s, p50/p99 latency, errors, the
mean batch size, the worker's busy share and the CPU time per request of the server process
(all threads; ``loop`` = its event-loop thread alone) and of the client. Interleaved with the
load (in rounds, so that on a shared machine both see the same background load), with the
server idle, it times the bare infer callable the workers use at batch size = concurrency
(capped by max_batch_size) in this process, laid out as the service's workers are (streams x
torch threads, resolved from the same settings): ``ratio`` is the service's req/s over the
engine's crops/s, the share of raw model throughput the service keeps (1 request = 1 crop:
flip test off unless ``--flip``). ``ratio_1_stream`` compares with one stream on torch's
default threads instead (the layout before CPU hosts got one single-threaded worker per core).
With ``DITEPOSE_WORKER_PROCESSES=true`` in the environment the server runs its workers' engines in
child processes and the engine is timed the same way (one engine process per stream).

By default two models are measured in one run: the shipped demo checkpoint (128x96 input,
a cheap network, so the per-request overhead weighs most) and a Dite-HRNet-18 at the
paper's 256x192 (weights do not change the speed: the reference fixture's random weights, or
freshly built ones). ``--null-network`` serves the same models with a zero-cost network
(:mod:`bench.null_serve`) to measure the service's own per-request cost.

    python bench/service.py --quick          # writes bench/results/service.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.loadgen import STAGES, LevelResult, pose_request, run_level  # noqa: E402
from bench.service_support import ProcCpu, free_port, test_jpeg, tree_memory_mb  # noqa: E402
from bench.shared import shared_file  # noqa: E402


def _default_checkpoints(workdir: Path) -> list[Path]:
    """The demo checkpoint (128x96) and a Dite-HRNet-18 at the paper's 256x192."""
    from ditepose import model
    found = []
    demo = model.default_checkpoint_path()
    if demo is not None:
        found.append(Path(demo))
    ref = shared_file("fixtures", "reference", "dite_hrnet_18_coco_random.pth")
    if ref is not None and tuple(model.load_pose_model(ref)[1].input_size) == (192, 256):
        found.append(ref)
    else:
        path = workdir / "dite_hrnet_18_coco_256x192_random.pth"
        meta = model.CheckpointMeta("dite_hrnet_18", "coco", 17, input_size=(192, 256),
                                    extra={"notes": "random weights, for speed only"})
        model.save_checkpoint(path, model.build_model("dite_hrnet_18").eval(), meta)
        found.append(path)
    return found


def _metric_sums(metrics: str) -> dict[str, float]:
    out = {}
    for name in ("batch_size", "inference_duration_seconds", "queue_wait_seconds"):
        for part in ("sum", "count"):
            pattern = rf"^ditepose_{name}_{part}\{{[^}}]*\}} (\S+)$"
            out[f"{name}_{part}"] = sum(float(v) for v in re.findall(pattern, metrics, re.M))
    return out


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


class _Engine:
    """The workers' infer callable (same weights, same factory) on the service's own crops.

    Timed in the service's own worker layout (``streams`` threads sharing one infer callable,
    each with ``threads`` torch threads, as the pool resolves them from the same settings), and
    also as one stream with torch's default threads. Real crops of the test image, not random
    tensors: random inputs can run far slower or faster (denormals), which would make the ratio
    meaningless.
    """

    def __init__(self, checkpoint: Path, flip: bool) -> None:
        from ditepose.model.pipeline import TopDownPipeline
        from ditepose.service.batching.infer import make_infer
        from ditepose.service.core.images import decode_image
        from ditepose.service.core.model_loader import load_model
        from ditepose.service.core.settings import ModelSpec, Settings

        settings = Settings(_env_file=REPO_ROOT / ".env", models=[ModelSpec(name="bench", checkpoint=checkpoint)])
        self.streams = settings.resolved_workers_per_device()
        self.threads = settings.resolved_torch_threads() or torch.get_num_threads()
        self.default_threads = torch.get_num_threads()
        loaded = load_model(ModelSpec(name="bench", checkpoint=checkpoint))
        self.input_size = loaded.input_size
        self.infer = make_infer(loaded.module, "cuda:0" if torch.cuda.is_available() else "cpu",
                                engine=settings.engine)
        # DITEPOSE_WORKER_PROCESSES: the workers' engines run in child processes, one per worker
        self.processes = settings.worker_processes and not torch.cuda.is_available()
        self.stream_infers = (
            [make_infer(loaded.module, "cpu", process=True, threads=self.threads, engine="torch")
             for _ in range(self.streams)]
            if self.processes else [self.infer] * self.streams
        )
        jpeg, box = test_jpeg()
        pipe = TopDownPipeline(loaded.input_size, loaded.spec, flip_test=flip)
        self.one = pipe.prepare(decode_image(jpeg, 10**8, 10**8), [box]).crops

    def run(self, batch: int, min_s: float, streams: int, threads: int) -> tuple[float, float, float]:
        """(crops, seconds, CPU seconds) of ``streams`` threads running forward passes at ``batch``
        crops at once for at least ``min_s``."""
        crops = self.one.repeat(batch, 1, 1, 1).contiguous()
        counts = [0] * streams
        marks: list[float] = []
        barrier = threading.Barrier(streams)
        infers = self.stream_infers if streams == self.streams else [self.infer] * streams

        def cpu_now() -> float:  # this process and the engine processes (if any)
            return time.process_time() + sum(getattr(i, "cpu_seconds", lambda: 0.0)() for i in set(infers))

        def measure(index: int) -> None:
            # On threads of their own, as in the worker pool: torch's CPU threading differs between
            # the main thread and others; thread counts are set per thread, as the workers do.
            torch.set_num_threads(threads)
            infers[index](crops)  # warm-up
            if barrier.wait() == 0:
                marks.extend([time.perf_counter(), cpu_now()])
            barrier.wait()
            while counts[index] < 2 * batch or time.perf_counter() - marks[0] < min_s:
                infers[index](crops)
                counts[index] += batch

        workers = [threading.Thread(target=measure, args=(i,)) for i in range(streams)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return sum(counts), time.perf_counter() - marks[0], cpu_now() - marks[1]


def _start_server(checkpoint: Path, port: int, max_batch: int, null_network: bool,
                  serve_args: list[str] | None = None, engine: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if engine is not None:
        env["DITEPOSE_ENGINE"] = engine
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["DITEPOSE_MODELS"] = json.dumps([{"name": "bench", "checkpoint": str(checkpoint)}])
    env["DITEPOSE_MAX_BATCH_SIZE"] = str(max_batch)
    env["DITEPOSE_QUEUE_SIZE"] = "4096"
    if null_network:
        cmd = [sys.executable, "-m", "bench.null_serve", "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "ditepose", "serve", "--port", str(port), "--no-grpc", *(serve_args or [])]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a first start exports and compiles OpenVINO's models (cached after)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if json.loads(_get(f"http://127.0.0.1:{port}/readyz")).get("ready"):
                return proc
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def _level(port: int, proc_cpu: ProcCpu, request: bytes, concurrency: int, requests: int,
           engine: _Engine | None, batch: int, rounds: int, engine_s: float, settle_s: float = 0.0,
           server_pid: int | None = None, persons: int = 1) -> dict:
    """One concurrency level in ``rounds`` load chunks, each preceded (and the last one followed)
    by an engine chunk: on a shared machine, interleaving makes both sides see the same load.
    ``settle_s``: wait before reading /metrics after a chunk (behind --api-processes a front-end
    learns the host's batch observations every 0.25 s)."""
    asyncio.run(run_level("127.0.0.1", port, request, concurrency, 2 * concurrency, persons))  # warm-up, not counted
    engine_runs: list[tuple[float, float, float]] = []  # (crops, seconds, cpu seconds), service layout
    single_runs: list[tuple[float, float, float]] = []  # one stream, torch's default threads
    run, delta, server_cpu, loop_cpu = LevelResult(), dict.fromkeys(_metric_sums(""), 0.0), 0.0, 0.0
    for index in range(rounds):
        if engine is not None:
            engine_runs.append(engine.run(batch, engine_s, engine.streams, engine.threads))
            single_runs.append(engine.run(batch, engine_s / 2, 1, engine.default_threads))
        chunk = requests // rounds + (1 if index < requests % rounds else 0)
        before, cpu_before = _metric_sums(_get(f"http://127.0.0.1:{port}/metrics")), proc_cpu.read()
        run.merge(asyncio.run(run_level("127.0.0.1", port, request, concurrency, chunk, persons)))
        time.sleep(settle_s)
        cpu_after, after = proc_cpu.read(), _metric_sums(_get(f"http://127.0.0.1:{port}/metrics"))
        for key in delta:
            delta[key] += after[key] - before[key]
        server_cpu += cpu_after[0] - cpu_before[0]
        loop_cpu += cpu_after[1] - cpu_before[1]
    if engine is not None:
        engine_runs.append(engine.run(batch, engine_s, engine.streams, engine.threads))
        single_runs.append(engine.run(batch, engine_s / 2, 1, engine.default_threads))
    ok = len(run.latencies_s)
    lat_ms = sorted(x * 1000 for x in run.latencies_s)
    batches = delta["batch_size_count"]
    level = {
        "concurrency": concurrency,
        "requests": requests,
        "rounds": rounds,
        "ok": ok,
        "errors": run.errors,
        "wall_s": round(run.wall_s, 3),
        "req_per_s": round(ok / run.wall_s, 3),
        "p50_ms": round(statistics.median(lat_ms), 1) if lat_ms else None,
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 1) if lat_ms else None,
        "mean_batch": round(delta["batch_size_sum"] / batches, 2) if batches else None,
        "worker_busy": round(delta["inference_duration_seconds_sum"] / run.wall_s, 3),
        "mean_queue_wait_ms": round(1000 * delta["queue_wait_seconds_sum"] / batches, 1) if batches else None,
        "server_cpu_ms_per_req": round(1000 * server_cpu / requests, 2),
        "server_loop_cpu_ms_per_req": round(1000 * loop_cpu / requests, 2),
        "client_cpu_ms_per_req": round(1000 * run.client_cpu_s / requests, 2),
        "server_stages_mean_ms": {s: round(run.stage_sums_ms[s] / ok, 2) for s in STAGES} if ok else None,
        # per server process after this level: RSS now and its peak (VmHWM) since the server started
        "server_memory_mb": tree_memory_mb(server_pid) if server_pid is not None else None,
    }
    if engine is not None:
        crops, seconds, cpu = (sum(r[i] for r in engine_runs) for i in range(3))
        rate = crops / seconds
        single = sum(r[0] for r in single_runs) / sum(r[1] for r in single_runs)
        kind = "processes" if engine.processes else "streams"
        level.update(engine_batch=batch, engine_layout=f"{engine.streams} {kind} x {engine.threads} threads",
                     engine_req_per_s=round(rate, 3),
                     engine_req_per_s_chunks=[round(r[0] / r[1], 2) for r in engine_runs],
                     engine_cpu_ms_per_crop=round(1000 * cpu / crops, 2), ratio=round(level["req_per_s"] / rate, 3),
                     engine_1_stream_req_per_s=round(single, 3),
                     ratio_1_stream=round(level["req_per_s"] / single, 3))
    return level


RIDERS = REPO_ROOT / "docs" / "riders.jpg"
RIDERS_PERSONS = 3  # NanoDet's people on it at the default 0.3, torch and OpenVINO (tests/model/test_openvino_engine.py)


def bench_checkpoint(checkpoint: Path, args: argparse.Namespace, serve_engine: str | None = None) -> dict:
    """Every concurrency level against one model, interleaved with the engine at that batch.

    ``serve_engine`` (``--engines``): the server runs with ``DITEPOSE_ENGINE`` set to it and is sent
    docs/riders.jpg without boxes (its detector and the pose network on that engine, end to end); the
    bare-engine comparison is left out (its crops are the one-person test image's)."""
    jpeg, box = test_jpeg()
    port = free_port()
    request = (pose_request("127.0.0.1", port, RIDERS.read_bytes(), None, args.flip) if serve_engine is not None
               else pose_request("127.0.0.1", port, jpeg, [box], args.flip))
    engine = None if args.null_network or serve_engine is not None else _Engine(checkpoint, args.flip)
    proc = _start_server(checkpoint, port, args.max_batch_size, args.null_network, args.serve_arg, serve_engine)
    served = json.loads(_get(f"http://127.0.0.1:{port}/v1/models"))["models"][0].get("engines", {})
    levels = []
    try:
        proc_cpu = ProcCpu(proc.pid)
        idle_memory = tree_memory_mb(proc.pid)
        persons = RIDERS_PERSONS if serve_engine is not None else 1
        asyncio.run(run_level("127.0.0.1", port, request, 2, 4, persons))  # warm-up
        for c in args.concurrency:
            n = args.requests or (max(16, 4 * c) if args.quick else max(160, 16 * c))
            rounds, engine_s = (2, 0.5) if args.quick else (4, 1.5)
            settle_s = 0.6 if "--api-processes" in args.serve_arg else 0.0
            level = _level(port, proc_cpu, request, c, n, engine, min(c, args.max_batch_size), rounds, engine_s,
                           settle_s, server_pid=proc.pid, persons=persons)
            levels.append(level)
            print(f"  concurrency {c}: {level['req_per_s']} req/s; engine {level.get('engine_req_per_s')}/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    from ditepose import model
    meta = model.load_pose_model(checkpoint)[1]
    return {"checkpoint": str(checkpoint), "arch": meta.arch, "input_wh": list(meta.input_size),
            "engine_setting": serve_engine, "served_engines": served,
            "request": "docs/riders.jpg, no boxes (detector + pose)" if serve_engine else "one person, box given",
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "server_memory_idle_mb": idle_memory,
            "levels": levels}


def _print(run: dict) -> None:
    w, h = run["input_wh"]
    chosen = ", ".join(f"{d}: {e['backend']} {e['precision']}" for d, e in (run.get("served_engines") or {}).items())
    print(f"{run['arch']} {h}x{w} ({run['checkpoint']}); engine {run.get('engine_setting') or 'default'}"
          + (f" -> {chosen}" if chosen else "") + f"; {run.get('request')}")
    print(f"{'conc':>5} {'reqs':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'batch':>6} "
          f"{'busy':>5} {'srv cpu':>8} {'loop':>6} {'client':>7} {'engine/s':>9} {'ratio':>6} {'1-str/s':>8} {'ratio':>6}"
          f" {'peak MiB':>9}")
    for r in run["levels"]:
        print(f"{r['concurrency']:>5} {r['requests']:>5} {r['req_per_s']:>8.2f} {r['p50_ms'] or 0:>8.1f} "
              f"{r['p99_ms'] or 0:>8.1f} {sum(r['errors'].values()):>7} {r['mean_batch'] or 0:>6.2f} "
              f"{r['worker_busy']:>5.2f} {r['server_cpu_ms_per_req']:>8.2f} {r['server_loop_cpu_ms_per_req']:>6.2f} "
              f"{r['client_cpu_ms_per_req']:>7.2f} {r.get('engine_req_per_s', 0):>9.2f} {r.get('ratio', 0):>6.2f} "
              f"{r.get('engine_1_stream_req_per_s', 0):>8.2f} {r.get('ratio_1_stream', 0):>6.2f}"
              f" {_peak_mb(r):>9.1f}")
    idle = sum(p["rss_mb"] for p in run["server_memory_idle_mb"])
    print(f"server RSS idle {idle:.1f} MiB; per process after the last level: "
          + ", ".join(f"{p['name']}[{p['pid']}] {p['rss_mb']} (peak {p['peak_rss_mb']})"
                      for p in run["levels"][-1]["server_memory_mb"] or []) if run["levels"] else "")


def _peak_mb(level: dict) -> float:
    """The server's peak RSS over its processes (sum of each one's VmHWM: an upper bound of the tree's)."""
    return sum(p["peak_rss_mb"] for p in level.get("server_memory_mb") or [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few requests per level (under a minute on 2 cores)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int,
                        help="requests per level (default: 16x concurrency, >= 160; quick: 4x, >= 16)")
    parser.add_argument("--checkpoint", type=Path, nargs="+", default=None,
                        help="weights to serve, one run each (default: the demo model and an HRNet-18 at 256x192)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--flip", action="store_true", help="flip test on (2 crops per request)")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="one more argument of `ditepose serve` (repeat it: --serve-arg=--api-processes "
                             "--serve-arg=4); settings come from DITEPOSE_* variables too")
    parser.add_argument("--null-network", action="store_true",
                        help="serve a zero-cost network: the service's own per-request cost")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default bench/results/service.json; service_null.json with --null-network)")
    parser.add_argument("--engines", default=None,
                        help="comma-separated DITEPOSE_ENGINE values to compare in one run (e.g. torch,auto), each "
                             "served docs/riders.jpg without boxes; default: the server's setting, boxes given")
    args = parser.parse_args(argv)
    out = args.out or REPO_ROOT / "bench" / "results" / ("service_null.json" if args.null_network else "service.json")

    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = args.checkpoint or _default_checkpoints(Path(tmp))
        engines = args.engines.split(",") if args.engines else [None]
        runs = [bench_checkpoint(ckpt, args, engine) for ckpt in checkpoints for engine in engines]
    for run in runs:
        _print(run)
        if run["checkpoint"].startswith(tmp):
            run["checkpoint"] = "(random dite_hrnet_18 at 256x192, built for the run)"
    result = {
        "what": "REST /v1/pose over loopback, one person per 640x480 JPEG, vs the infer callable alone"
        + (" (null network: zero-cost forward pass)" if args.null_network else ""),
        "quick": args.quick,
        "flip_test": args.flip,
        "client": "bench/loadgen.py (asyncio HTTP/1.1 keep-alive, prebuilt multipart request)",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "max_batch_size": args.max_batch_size,
        "serve_args": args.serve_arg,
        "server_devices": os.environ.get("DITEPOSE_DEVICES", "auto"),
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
