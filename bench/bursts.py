"""Memory under bursts: RSS of a ``ditepose serve`` process tree idle, at its peak and settled after
repeated bursts of concurrent requests at the admission limit, with the memory fixes on and off.

``python -m bench.bursts [--bursts 3] [--concurrency N] [--baseline-commit 789a1ed] [--memray FILE]``

Each variant starts the server with ``make run``'s defaults (no flags: the demo model, the default
detector, every other setting from ``DITEPOSE_*`` variables), waits until it is ready, reads RSS,
then sends ``--bursts`` bursts of ``--concurrency`` simultaneous ``POST /v1/pose`` of ``--image``
without boxes (the detector finds the persons), one after the other. The default concurrency is
the admission limit (``Settings.resolved_max_in_flight``: 288 on a 2-core host), so every burst
fills the queues; answers past them are 429. After each burst and ``--settle`` seconds it reads RSS
and peak RSS (VmHWM, the kernel's high-water mark since start) of every process of the tree.

Variants, one run: ``after`` (the defaults), ``fixes off`` (``DITEPOSE_TRIM_MEMORY_WHEN_IDLE=false``,
``DITEPOSE_MAX_CONCURRENT_DECODES=1024``; crops still queue as uint8, which has no switch), and with
``--baseline-commit REV`` the service as it was at REV (a ``git worktree`` of it, run with an
import map pointing there). Growth over idle = settled RSS after the last burst - idle RSS.
``--memray FILE`` runs the ``after`` server under ``memray run`` (``memray tree FILE`` shows what was
live at the peak). Writes ``bench/results/bursts.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.service_support import free_port, tree_memory_mb  # noqa: E402

FIXES_OFF = {"DITEPOSE_TRIM_MEMORY_WHEN_IDLE": "false", "DITEPOSE_MAX_CONCURRENT_DECODES": "1024"}

# Run in a baseline tree: the editable install maps ``ditepose.*`` to this checkout; point it there.
_SITECUSTOMIZE = """import os, sys
TREE = {tree!r}
for _name, _mod in list(sys.modules.items()):
    if _name.startswith("__editable___ditepose") and hasattr(_mod, "MAPPING"):
        _root = os.path.commonpath(list(_mod.MAPPING.values()))
        for _key, _value in list(_mod.MAPPING.items()):
            _mod.MAPPING[_key] = os.path.join(TREE, os.path.relpath(_value, _root))
"""


@dataclass
class Variant:
    """One server configuration: its name, extra environment and the tree it runs from."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    tree: Path = REPO_ROOT
    memray: Path | None = None


def _start(variant: Variant, port: int, grpc_port: int, log_path: Path) -> subprocess.Popen:
    serve = ["-m", "ditepose", "serve", "--port", str(port), "--grpc-port", str(grpc_port)]
    prefix = [sys.executable]
    if variant.memray:
        prefix += ["-m", "memray", "run", "--force", "-o", str(variant.memray)]
    env = {**os.environ, **variant.env}
    with open(log_path, "wb") as log:
        return subprocess.Popen(prefix + serve, cwd=variant.tree, env=env, stdout=log, stderr=subprocess.STDOUT)


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


async def _burst(base: str, image: bytes, concurrency: int, timeout_s: float) -> tuple[Counter[str], float, list[float]]:
    """``concurrency`` requests sent at once: their status codes, the burst's wall time and the
    latencies (s) of the answers that were 200."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s, limits=limits) as client:
        async def one() -> str:
            started = time.perf_counter()
            try:
                response = await client.post("/v1/pose", files={"image": ("riders.jpg", image, "image/jpeg")})
            except httpx.HTTPError as exc:
                return type(exc).__name__
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            return str(response.status_code)

        started = time.perf_counter()
        codes = await asyncio.gather(*(one() for _ in range(concurrency)))
        return Counter(codes), time.perf_counter() - started, latencies


def _total(rows: list[dict], key: str) -> float:
    return round(sum(r[key] for r in rows), 1)


def _burst_row(index: int, codes: Counter[str], wall_s: float, latencies: list[float], memory: list[dict]) -> dict:
    ok = codes.get("200", 0)
    return {"burst": index + 1, "codes": dict(codes), "wall_s": round(wall_s, 2),
            "ok_per_s": round(ok / wall_s, 2) if wall_s > 0 else None,
            "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
            "rss_mb": _total(memory, "rss_mb"), "peak_rss_mb": _total(memory, "peak_rss_mb"), "processes": memory}


def run_variant(variant: Variant, args: argparse.Namespace, image: bytes, concurrency: int) -> dict:
    """Idle RSS, then the bursts, of one server started for ``variant``."""
    port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = args.log_dir / f"bursts-{variant.name.replace(' ', '-')}.log"
    proc = _start(variant, port, grpc_port, log_path)
    bursts: list[dict] = []
    try:
        _wait_ready(base, proc)
        time.sleep(args.settle)
        idle = tree_memory_mb(proc.pid)  # under memray too: `memray run` runs the module in its own interpreter
        print(f"[{variant.name}] idle: RSS {_total(idle, 'rss_mb')} MiB", flush=True)
        for index in range(args.bursts):
            codes, wall_s, latencies = asyncio.run(_burst(base, image, concurrency, args.timeout))
            time.sleep(args.settle)
            bursts.append(_burst_row(index, codes, wall_s, latencies, tree_memory_mb(proc.pid)))
            row = bursts[-1]
            print(f"[{variant.name}] burst {index + 1}: {dict(codes)} in {wall_s:.1f} s ({row['ok_per_s']} ok/s, "
                  f"p50 {row['p50_ms']} ms); RSS {row['rss_mb']} MiB (peak {row['peak_rss_mb']})", flush=True)
    finally:
        proc.terminate()
        proc.wait(120)
    last = bursts[-1]
    return {"variant": variant.name, "env": variant.env, "tree": str(variant.tree), "log": str(log_path),
            "idle_rss_mb": _total(idle, "rss_mb"), "peak_rss_mb": last["peak_rss_mb"],
            "settled_rss_mb": last["rss_mb"], "growth_over_idle_mb": round(last["rss_mb"] - _total(idle, "rss_mb"), 1),
            "ok_per_s": _mean(b["ok_per_s"] for b in bursts), "p50_ms": _mean(b["p50_ms"] for b in bursts),
            "idle_processes": idle, "bursts": bursts}


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.fmean(present), 2) if present else None


def baseline_tree(commit: str, where: Path) -> Variant:
    """A detached ``git worktree`` of ``commit`` and a ``sitecustomize`` that imports ``ditepose`` from it."""
    tree = where / f"ditepose-{commit}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=REPO_ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    site = where / f"site-{commit}"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(tree=str(tree)))
    return Variant(f"commit {commit}", {"PYTHONPATH": str(site)}, tree)


def admission_limit() -> int:
    """The server's ``max_in_flight`` under this environment (the bench and server read the same one)."""
    from ditepose.service.core.settings import Settings

    return Settings().resolved_max_in_flight


def _table(results: list[dict]) -> str:
    lines = [f"{'variant':<18} {'idle':>7} {'peak':>7} {'settled':>8} {'growth':>7} {'ok/s':>6} {'p50 ms':>8}"]
    for r in results:
        lines.append(f"{r['variant']:<18} {r['idle_rss_mb']:>7} {r['peak_rss_mb']:>7} {r['settled_rss_mb']:>8} "
                     f"{r['growth_over_idle_mb']:>7} {r['ok_per_s']!s:>6} {r['p50_ms']!s:>8}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    image = args.image.read_bytes()
    concurrency = args.concurrency or admission_limit()
    known = {"after": Variant("after", memray=args.memray), "fixes-off": Variant("fixes off", dict(FIXES_OFF))}
    variants = [known[name] for name in args.variants.split(",") if name]
    if args.baseline_commit:
        variants.append(baseline_tree(args.baseline_commit, Path(tempfile.gettempdir())))
    try:
        results = [run_variant(v, args, image, concurrency) for v in variants]
    finally:  # the baseline's worktree goes again, so the repository keeps no stray worktree
        for variant in variants:
            if variant.tree != REPO_ROOT:
                subprocess.run(["git", "worktree", "remove", "--force", str(variant.tree)], cwd=REPO_ROOT,
                               check=False, stdout=subprocess.DEVNULL)
    print(_table(results), flush=True)
    return {
        "bench": "bursts",
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "note": args.machine_note, "load_avg_at_end": os.getloadavg()},
        "config": {"bursts": args.bursts, "concurrency": concurrency, "image": str(args.image),
                   "settle_s": args.settle, "memray": str(args.memray) if args.memray else None},
        "table": _table(results).splitlines(),
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=None, help="default: the admission limit")
    parser.add_argument("--image", type=Path, default=REPO_ROOT / "docs" / "riders.jpg")
    parser.add_argument("--timeout", type=float, default=300.0, help="client timeout per request (s)")
    parser.add_argument("--settle", type=float, default=5.0, help="pause before each reading (s)")
    parser.add_argument("--variants", default="after,fixes-off", help="comma list of: after, fixes-off")
    parser.add_argument("--baseline-commit", default=None, help="also measure the service at this commit")
    parser.add_argument("--memray", type=Path, default=None, help="run the 'after' server under memray, capture here")
    parser.add_argument("--machine-note", default="", help="what the machine is and what else ran (for the JSON)")
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()), help="server output")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "bursts.json")
    args = parser.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
