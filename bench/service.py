"""Loopback load test of the REST service, against the engine's own throughput.

Starts ``ditepose serve`` as a subprocess, sends one-person 640x480 JPEGs at a fixed
concurrency (a bounded number of requests per level), and reports req/s, p50/p99 latency
and errors. Then, with the server stopped, it times the bare infer callable the workers use
at batch size = concurrency (capped by max_batch_size) in this process: ``ratio`` is the
service's req/s over the engine's crops/s, i.e. the share of raw model throughput the
service keeps (1 request = 1 crop: flip test off unless ``--flip``).

    python bench/service.py --quick          # writes bench/results/service.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _default_checkpoint() -> Path | None:
    import model

    path = model.default_checkpoint_path()
    if path is not None:
        return Path(path)
    for shared in (REPO_ROOT.parent / "shared", Path("/work/shared")):
        candidate = shared / "fixtures" / "reference" / "dite_hrnet_18_coco_random.pth"
        if candidate.is_file():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _test_jpeg() -> tuple[bytes, list[float]]:
    img = np.full((480, 640, 3), 190, np.uint8)
    cv2.circle(img, (320, 90), 28, (140, 170, 220), -1)
    cv2.line(img, (320, 120), (320, 280), (160, 40, 40), 18)
    for dx in (-70, 70):
        cv2.line(img, (320, 150), (320 + dx, 230), (160, 40, 40), 10)
        cv2.line(img, (320, 280), (320 + dx // 2, 420), (30, 30, 30), 12)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes(), [230.0, 50.0, 180.0, 390.0]


def _batch_stats(metrics: str) -> tuple[float, float]:
    total = sum(float(v) for v in re.findall(r"^ditepose_batch_size_sum\{[^}]*\} (\S+)$", metrics, re.M))
    count = sum(float(v) for v in re.findall(r"^ditepose_batch_size_count\{[^}]*\} (\S+)$", metrics, re.M))
    return total, count


async def _load(url: str, concurrency: int, requests: int, jpeg: bytes, box: list[float], flip: bool) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    remaining = requests
    data = {"boxes": json.dumps([box]), "flip_test": str(flip).lower()}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/pose", files={"image": ("p.jpg", jpeg, "image/jpeg")}, data=data)
                    code = "ok" if response.status_code == 200 else response.json()["error"]["code"]
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                if code == "ok":
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[code] = errors.get(code, 0) + 1

        before = _batch_stats((await client.get("/metrics")).text)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        after = _batch_stats((await client.get("/metrics")).text)
    batches = after[1] - before[1]
    lat_ms = sorted(x * 1000 for x in latencies)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "ok": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 3),
        "req_per_s": round(len(latencies) / wall, 3),
        "p50_ms": round(statistics.median(lat_ms), 1) if lat_ms else None,
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 1) if lat_ms else None,
        "mean_batch": round((after[0] - before[0]) / batches, 2) if batches else None,
    }


class _Engine:
    """The workers' infer callable (same weights, same factory) on the service's own crops.

    Real crops of the test image, not random tensors: random inputs can run far slower or
    faster (denormals), which would make the ratio meaningless.
    """

    def __init__(self, checkpoint: Path, flip: bool) -> None:
        from model.pipeline import TopDownPipeline
        from service.images import decode_image
        from service.infer import make_infer
        from service.registry import load_model
        from service.settings import ModelSpec

        loaded = load_model(ModelSpec(name="bench", checkpoint=checkpoint))
        self.infer = make_infer(loaded.module, "cuda:0" if torch.cuda.is_available() else "cpu")
        jpeg, box = _test_jpeg()
        pipe = TopDownPipeline(loaded.input_size, loaded.spec, flip_test=flip)
        self.one = pipe.prepare(decode_image(jpeg, 10**8, 10**8), [box]).crops

    def throughput(self, batch: int, min_s: float) -> float:
        """Requests' worth of crops per second at ``batch`` requests per forward pass."""
        crops = self.one.repeat(batch, 1, 1, 1).contiguous()
        result: list[float] = []

        def measure() -> None:
            self.infer(crops)  # warm-up
            runs, started = 0, time.perf_counter()
            while runs < 2 or time.perf_counter() - started < min_s:
                self.infer(crops)
                runs += 1
            result.append(batch * runs / (time.perf_counter() - started))

        # On a thread of its own, as in the worker pool: torch's CPU threading differs
        # between the main thread and others, and the comparison must be like for like.
        thread = threading.Thread(target=measure)
        thread.start()
        thread.join()
        return result[0]


def _start_server(checkpoint: Path, port: int, max_batch: int) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["DITEPOSE_MODELS"] = json.dumps([{"name": "bench", "checkpoint": str(checkpoint)}])
    env["DITEPOSE_MAX_BATCH_SIZE"] = str(max_batch)
    env["DITEPOSE_QUEUE_SIZE"] = "4096"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--no-grpc"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few requests per level (about a minute on 2 cores)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, help="requests per level (default: 4x concurrency, >= 16; quick: 2x, >= 8)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="weights (default: the project's default)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--flip", action="store_true", help="flip test on (2 crops per request)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "service.json")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or _default_checkpoint()
    if checkpoint is None:
        parser.error("no checkpoint found; pass --checkpoint")

    jpeg, box = _test_jpeg()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_server(checkpoint, port, args.max_batch_size)
    levels = []
    engine = _Engine(checkpoint, args.flip)
    try:
        asyncio.run(_load(url, 2, 4, jpeg, box, args.flip))  # warm-up
        for c in args.concurrency:
            n = args.requests or (max(8, 2 * c) if args.quick else max(16, 4 * c))
            level = asyncio.run(_load(url, c, n, jpeg, box, args.flip))
            # Right after the load, while the (idle) server waits: the same machine state.
            batch = min(c, args.max_batch_size)
            rate = engine.throughput(batch, 1.0 if args.quick else 3.0)
            level.update(engine_batch=batch, engine_req_per_s=round(rate, 3), ratio=round(level["req_per_s"] / rate, 3))
            levels.append(level)
            print(f"  concurrency {c}: {level['req_per_s']} req/s; engine {level['engine_req_per_s']}/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)

    header = f"{'conc':>5} {'reqs':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'batch':>6} {'engine/s':>9} {'ratio':>6}"
    print(header)
    for r in levels:
        print(
            f"{r['concurrency']:>5} {r['requests']:>5} {r['req_per_s']:>8.2f} {r['p50_ms'] or 0:>8.1f} "
            f"{r['p99_ms'] or 0:>8.1f} {sum(r['errors'].values()):>7} {r['mean_batch'] or 0:>6.2f} "
            f"{r['engine_req_per_s']:>9.2f} {r['ratio']:>6.2f}"
        )
    result = {
        "what": "REST /v1/pose over loopback, one person per 640x480 JPEG, vs the infer callable alone",
        "quick": args.quick,
        "flip_test": args.flip,
        "checkpoint": str(checkpoint),
        "load_average_at_end": list(os.getloadavg()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "max_batch_size": args.max_batch_size,
        "levels": levels,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
