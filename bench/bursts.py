"""Memory under bursts: RSS of a ``ditepose serve`` process tree idle, after each burst of concurrent requests.

``python -m bench.bursts [--bursts 6] [--concurrency 64] [--image docs/riders.jpg] [--memray FILE]``

Starts the server with ``make run``'s defaults (no flags: the demo model, the default detector,
every setting from ``DITEPOSE_*`` variables, so ``MALLOC_ARENA_MAX=2 python -m bench.bursts`` tries
an allocator setting), waits until it is ready, then sends ``--bursts`` bursts of ``--concurrency``
simultaneous ``POST /v1/pose`` of ``--image`` without boxes (the detector finds the persons), one
burst after the other. After each it reads RSS and peak RSS (VmHWM) of every process of the
server's tree from ``/proc``. ``--memray FILE`` runs the server under ``memray run`` (every
allocation, native ones included, attributed to the Python stack that made it) so ``memray tree
FILE`` shows what was live at the peak. Writes ``bench/results/bursts.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.service_support import free_port, tree_memory_mb  # noqa: E402


def _start(port: int, grpc_port: int, log_path: Path, memray: Path | None, serve_args: list[str]) -> subprocess.Popen:
    serve = ["-m", "ditepose", "serve", "--port", str(port), "--grpc-port", str(grpc_port), *serve_args]
    prefix = [sys.executable, "-m", "memray", "run", "--force", "-o", str(memray)] if memray else [sys.executable]
    with open(log_path, "wb") as log:
        return subprocess.Popen(prefix + serve, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)


def _wait_ready(base: str, proc: subprocess.Popen, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


async def _burst(base: str, image: bytes, concurrency: int, timeout_s: float) -> tuple[Counter[str], float]:
    """``concurrency`` requests sent at once; their status codes and the burst's wall time."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s, limits=limits) as client:
        async def one() -> str:
            try:
                response = await client.post("/v1/pose", files={"image": ("riders.jpg", image, "image/jpeg")})
                return str(response.status_code)
            except httpx.HTTPError as exc:
                return type(exc).__name__

        started = time.perf_counter()
        codes = await asyncio.gather(*(one() for _ in range(concurrency)))
        return Counter(codes), time.perf_counter() - started


def _total(rows: list[dict], key: str) -> float:
    return round(sum(r[key] for r in rows), 1)


def run(args: argparse.Namespace) -> dict:
    image = args.image.read_bytes()
    port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start(port, grpc_port, args.log, args.memray, args.serve_arg)
    bursts = []
    try:
        _wait_ready(base, proc)
        time.sleep(args.settle)
        server_pid = proc.pid  # under memray too: `memray run` runs the module in its own interpreter
        idle = tree_memory_mb(server_pid)
        print(f"idle: RSS {_total(idle, 'rss_mb')} MiB", flush=True)
        for index in range(args.bursts):
            codes, wall_s = asyncio.run(_burst(base, image, args.concurrency, args.timeout))
            time.sleep(args.settle)
            memory = tree_memory_mb(server_pid)
            bursts.append({"burst": index + 1, "codes": dict(codes), "wall_s": round(wall_s, 2),
                           "rss_mb": _total(memory, "rss_mb"), "peak_rss_mb": _total(memory, "peak_rss_mb"),
                           "processes": memory})
            print(f"burst {index + 1}: {dict(codes)} in {wall_s:.1f} s; RSS {bursts[-1]['rss_mb']} MiB "
                  f"(peak {bursts[-1]['peak_rss_mb']})", flush=True)
    finally:
        proc.terminate()
        proc.wait(120)
    last = bursts[-1] if bursts else {"rss_mb": None, "peak_rss_mb": None}
    return {
        "bench": "bursts",
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "config": {"bursts": args.bursts, "concurrency": args.concurrency, "image": str(args.image),
                   "serve_args": args.serve_arg, "memray": str(args.memray) if args.memray else None},
        "idle": {"rss_mb": _total(idle, "rss_mb"), "processes": idle},
        "bursts": bursts,
        "growth_over_idle_mb": round(last["rss_mb"] - _total(idle, "rss_mb"), 1) if bursts else None,
        "peak_rss_mb": last["peak_rss_mb"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--image", type=Path, default=REPO_ROOT / "docs" / "riders.jpg")
    parser.add_argument("--timeout", type=float, default=300.0, help="client timeout per request (s)")
    parser.add_argument("--settle", type=float, default=2.0, help="pause before each reading (s)")
    parser.add_argument("--memray", type=Path, default=None, help="run the server under memray, capture here")
    parser.add_argument("--serve-arg", action="append", default=[], help="one more `ditepose serve` argument")
    parser.add_argument("--log", type=Path, default=Path("/tmp/ditepose-bursts.log"), help="server output")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "bursts.json")
    args = parser.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("bursts", "idle", "machine")}, indent=1))


if __name__ == "__main__":
    main()
