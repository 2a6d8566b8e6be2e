"""Evaluation jobs across Celery workers: the same job on 1 and on 2 worker processes.

``python bench/eval_scaling.py [--quick] [--images 400] [--shard-size 50] [--repeat 2]``

Starts a throw-away redis-server and real ``ditepose worker`` processes (one torch thread each,
``--concurrency 1``), writes 'demo-synthetic' at ``--images`` images (the built-in generator and
seed) to a temporary folder, and times one evaluation job, submitted through the API's
:class:`~ditepose.service.jobs.manager.JobService`, from submission to 'succeeded':

- 1 worker, 1 shard: the unsharded job (the baseline);
- 1 worker, N shards: the per-job overhead of sharding (split, a model load and a task per shard,
  the merge);
- 2 workers, N shards: the scaling (speed-up = the 1-worker sharded wall time / this one).

Every run must give the same metrics (checked; the job fails the bench otherwise). The workers
are started and warmed (one small job each) before the clock runs, so start-up is not counted.
Prints a table and writes JSON (bench/results/eval_scaling.json) with the machine and its load:
on a machine busy with other work the speed-up is lower than on an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.service_support import free_port  # noqa: E402
from tests.support import wait_until  # noqa: E402

DEFAULT_CHECKPOINT = REPO_ROOT / "model" / "weights" / "dite_hrnet_18_coco_demo.pth"


class Redis:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(workdir),
                                      "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_until(lambda: _pings(client), 10, "redis-server", interval=0.1)
        client.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


class Worker:
    """``python -m ditepose worker`` in a process group of its own."""

    def __init__(self, env: dict[str, str], name: str, log: Path) -> None:
        self.log = log
        self._fh = open(log, "ab")  # noqa: SIM115 - closed in stop()
        child_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ditepose", "worker", "--concurrency", "1", "--loglevel", "INFO",
             "--hostname", f"{name}@%h"],
            cwd=REPO_ROOT, env=child_env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
        return " ready." in self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._fh.close()


def _run_job(service: Any, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    from ditepose.service.jobs.schemas import EvaluateRequest

    t0 = time.perf_counter()
    rec = service.submit(EvaluateRequest(**request))
    done = wait_until(lambda: (r := service.get(rec.id)).state in ("succeeded", "failed", "cancelled") and r,
                       timeout, f"job {rec.id}", interval=0.05)
    wall = time.perf_counter() - t0
    if done.state != "succeeded":
        raise RuntimeError(f"job {rec.id} {done.state}: {done.error}")
    return {"wall_s": wall, "result": done.result, "shards": done.shards, "attempts": done.attempts}


def measure(layout: dict[str, Any], env: dict[str, str], workdir: Path, request: dict[str, Any], repeat: int,
            warm: dict[str, Any], timeout: float) -> dict[str, Any]:
    from ditepose.service.core.settings import Settings
    from ditepose.service.jobs.manager import JobService

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    run_env = dict(env, DITEPOSE_JOB_QUEUE=queue)
    workers = [Worker(run_env, f"w{i}", workdir / f"{queue}-w{i}.log") for i in range(layout["workers"])]
    service = JobService(Settings(_env_file=None, redis_url=env["DITEPOSE_REDIS_URL"], job_queue=queue,
                                  datasets=json.loads(env["DITEPOSE_DATASETS"]),
                                  checkpoint_dir=Path(env["DITEPOSE_CHECKPOINT_DIR"]),
                                  jobs_dir=Path(env["DITEPOSE_JOBS_DIR"]), demo_dataset=False,
                                  shard_size=int(env["DITEPOSE_SHARD_SIZE"]), max_shards=1024))
    try:
        wait_until(lambda: all(w.ready() for w in workers), 120, "the workers to be ready", interval=0.2)
        for _ in workers:  # warm each worker: imports, first forward passes (not part of a job's cost)
            _run_job(service, warm, timeout)
        runs = [_run_job(service, {**request, "shard_size": layout["shard_size"]}, timeout) for _ in range(repeat)]
    finally:
        service.close()
        for w in workers:
            w.stop()
    walls = [r["wall_s"] for r in runs]
    last = runs[-1]["result"]
    images = int(last["num_images"])
    wall = statistics.median(walls)
    return {
        "workers": layout["workers"],
        "shards": max(runs[-1]["shards"], 1),
        "wall_s": round(wall, 3),
        "wall_s_runs": [round(w, 3) for w in walls],
        "images": images,
        "persons": int(last["num_persons"]),
        "samples_per_s": round(images / wall, 2),
        "persons_per_s": round(int(last["num_persons"]) / wall, 2),
        "timings": {k: round(v, 3) for k, v in last["timings"].items()},
        "metrics": last["metrics"],
        "shard_workers": sorted({s["worker"] for s in last.get("shards", [])}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="96 images, shards of 12, one repeat (a smoke run)")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=2, help="timed jobs per layout (median reported)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="pose checkpoint (default: the bundled demo checkpoint)")
    parser.add_argument("--note", default="", help="free text recorded with the machine (e.g. 'loaded by ...')")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "eval_scaling.json")
    args = parser.parse_args()
    if args.quick:
        args.images, args.shard_size, args.repeat = 96, 12, 1

    import torch

    from ditepose.service.jobs.catalogue import DEMO_SEED
    from ditepose.training.synth import synthesize

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="eval-scaling-") as tmp:
        workdir = Path(tmp)
        data = workdir / "demo"
        ann = synthesize("coco", data, args.images, seed=DEMO_SEED, split="val")
        warm_ann = synthesize("coco", workdir / "warm", 4, seed=DEMO_SEED + 1, split="val")
        ckpt_dir = workdir / "checkpoints"
        ckpt_dir.mkdir()
        shutil.copy(args.checkpoint, ckpt_dir / "model.pth")
        redis = Redis(workdir)
        env = {
            "DITEPOSE_REDIS_URL": redis.url,
            "DITEPOSE_DATASETS": json.dumps({
                "demo-synthetic": {"format": "coco", "ann_file": str(ann), "img_dir": str(data / "val")},
                "warm": {"format": "coco", "ann_file": str(warm_ann), "img_dir": str(workdir / "warm" / "val")},
            }),
            "DITEPOSE_CHECKPOINT_DIR": str(ckpt_dir),
            "DITEPOSE_JOBS_DIR": str(workdir / "jobs"),
            "DITEPOSE_TORCH_THREADS": "1",
            "DITEPOSE_DEMO_DATASET": "false",
            "DITEPOSE_SHARD_SIZE": str(max(args.images, args.shard_size)),
        }
        request = {"dataset": "demo-synthetic", "checkpoint": "model.pth", "flip_test": args.flip_test,
                   "batch_size": args.batch_size}
        warm = {"dataset": "warm", "checkpoint": "model.pth", "flip_test": args.flip_test, "batch_size": 4}
        layouts = [
            {"name": "1 worker, 1 shard", "workers": 1, "shard_size": args.images},
            {"name": "1 worker, sharded", "workers": 1, "shard_size": args.shard_size},
            {"name": "2 workers, sharded", "workers": 2, "shard_size": args.shard_size},
        ]
        rows = []
        try:
            for layout in layouts:
                row = {"layout": layout["name"], **measure(layout, env, workdir, request, args.repeat, warm,
                                                           args.timeout)}
                rows.append(row)
                print(f"  {row['layout']:<20} {row['shards']:>3} shards  {row['wall_s']:8.2f} s  "
                      f"{row['samples_per_s']:7.2f} images/s", flush=True)
        finally:
            redis.stop()
    load_after = os.getloadavg()
    base, sharded, two = rows
    same = all(r["metrics"] == base["metrics"] for r in rows)
    if not same:
        raise SystemExit(f"the layouts disagree on the metrics: {[r['metrics'] for r in rows]}")
    for row in rows:
        row["speedup_vs_1_worker_sharded"] = round(sharded["wall_s"] / row["wall_s"], 3)
        row["speedup_vs_unsharded"] = round(base["wall_s"] / row["wall_s"], 3)
    result = {
        "what": "one evaluation job (demo-synthetic, COCO AP) from submission to 'succeeded', Celery workers "
                "on a local redis-server; workers warmed first, median of repeats",
        "quick": args.quick,
        "command": "python bench/eval_scaling.py" + (" --quick" if args.quick else ""),
        "images": args.images,
        "shard_size": args.shard_size,
        "checkpoint": args.checkpoint.name,
        "flip_test": args.flip_test,
        "batch_size": args.batch_size,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads_per_worker": 1,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after],
            "note": args.note,
        },
        "rows": rows,
        "speedup_2_workers": two["speedup_vs_1_worker_sharded"],
        "sharding_overhead_s": round(sharded["wall_s"] - base["wall_s"], 3),
        "sharding_overhead_per_shard_s": round((sharded["wall_s"] - base["wall_s"]) / max(sharded["shards"] - 1, 1), 3),
        "metrics_equal": same,
        "AP": base["metrics"].get("AP"),
    }
    print(f"\n{'layout':<20} {'shards':>6} {'wall s':>9} {'images/s':>9} {'speed-up':>9}")
    for row in rows:
        print(f"{row['layout']:<20} {row['shards']:>6} {row['wall_s']:>9.2f} {row['samples_per_s']:>9.2f} "
              f"{row['speedup_vs_1_worker_sharded']:>9.3f}")
    print(f"2 workers vs 1 (sharded): {result['speedup_2_workers']:.2f}x; sharding overhead on one worker: "
          f"{result['sharding_overhead_s']:+.2f} s ({result['sharding_overhead_per_shard_s']:+.3f} s per extra shard); "
          f"same metrics in every layout: {same}; load average {load_before[0]:.2f} -> {load_after[0]:.2f} "
          f"on {os.cpu_count()} cores")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
