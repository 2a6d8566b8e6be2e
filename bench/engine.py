"""Inference throughput of Dite-HRNet: the authors' eager graph vs. each optimised path, in one run.

    python bench/engine.py [--quick] [--json OUT] [--archs dite_hrnet_18 ...] [--compile]

Paths are timed in rounds: each round runs every path for a block of consecutive calls (steady
state, as a serving worker runs), and a path's figure is the median over rounds, so that a busy
machine slows every path alike. Run it on a quiet machine: with both cores contended, OpenMP's
barriers make the many-small-op eager graph collapse far more than the optimised paths, which
would flatter the speed-ups (``load_average_at_end`` is recorded for that reason).

"openvino f32" / "openvino bf16" are :class:`~ditepose.model.engines.openvino.OpenVinoEngine` (the
'fast' graph exported per batch size, OpenVINO's latency hint, ``--threads`` threads; bf16 only on
a CPU that has it), compiled once per batch size before timing (the IRs and blobs stay in
``~/.cache/ditepose/openvino``, so a second run starts at once).

"N streams x T threads" paths run N batches at once on N Python threads (and "N processes" paths
on N child processes, one engine each, so that they share no GIL), each with T intra-op
threads, as the service does with ``DITEPOSE_WORKERS_PER_DEVICE=N DITEPOSE_TORCH_THREADS=T``: one
call of such a path is N batches, and img/s counts all of them. The eager graph is timed that way
too, so the gain of the layout can be told from the gain of the optimised network.

Inputs are the authors' reference crops (``../shared/fixtures/reference``) when present, random
normal otherwise; weights are the reference checkpoints when present (random weights and inputs
can run into denormals, which are slow and not what a trained network sees). Peak memory is the RSS high-water mark over one call
(reset through /proc/self/clear_refs) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared import shared_file
from ditepose.model import build_model, load_checkpoint
from ditepose.model.engines import PRECISIONS, build_engine
from ditepose.model.engines.process_engine import ProcessEngine

REFERENCE_WEIGHTS = {"dite_hrnet_18": ("dite_hrnet_18_coco_random.pth", 17), "dite_hrnet_30": ("dite_hrnet_30_mpii_random.pth", 16)}
REFERENCE_INPUT = "dite_hrnet_18_coco_golden_io.pt"

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "engine_cpu.json"


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def peak_rss_delta_mb(fn: Callable[[], object]) -> float | None:
    """RSS high-water mark during ``fn()`` minus RSS before it (Linux), in MiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return None if before is None or peak is None else max(0, peak - before) / 1024


def cpu_seconds(fn: object) -> float:
    """CPU time of this process plus that of ``fn``'s engine processes, in seconds."""
    engines = fn.fns if isinstance(fn, Streams) else []
    return time.process_time() + sum(engine.cpu_seconds() for engine in engines if isinstance(engine, ProcessEngine))


class Streams:
    """Run ``fn`` (or one of ``fns`` per stream) on ``streams`` Python threads at once, each with
    ``threads`` intra-op threads."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor] | list, streams: int, threads: int) -> None:
        self.fns = fn if isinstance(fn, list) else [fn] * streams
        self.streams = streams
        self.pool = ThreadPoolExecutor(streams, initializer=torch.set_num_threads, initargs=(threads,))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.pool.map(lambda fn: fn(x), self.fns))


def cpu_model() -> str | None:
    """The CPU's marketing name (/proc/cpuinfo), which ``platform.processor()`` leaves empty on Linux."""
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        return None
    return match.group(1).strip() if match else None


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__)


def reference_model(arch: str) -> torch.nn.Module:
    name, joints = REFERENCE_WEIGHTS.get(arch, ("", 17))
    model = build_model(arch, num_joints=joints)
    weights = shared_file("fixtures", "reference", name) if name else None
    if weights is not None:
        load_checkpoint(model, weights)
    return model.eval()


def bench_input(batch: int, input_hw: tuple[int, int]) -> torch.Tensor:
    golden = shared_file("fixtures", "reference", REFERENCE_INPUT)
    if golden is not None and tuple(input_hw) == (256, 192):
        crops = torch.load(golden, weights_only=True)["input"]
        return crops[torch.arange(batch) % len(crops)].contiguous()
    return torch.randn(batch, 3, *input_hw, generator=torch.Generator().manual_seed(0))


EAGER = "eager (authors' graph)"
DEFAULT_PATH = "default CPU engine (auto)"
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "model" / "weights" / "dite_hrnet_18_coco_demo.pth"


def default_engine(arch: str, model: torch.nn.Module, input_hw: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The service's default CPU engine, chosen by the one resolver (engine auto, precision auto) behind
    its agreement gate. The gate judges trained weights: for Dite-HRNet-18 the shipped demo checkpoint
    (the calibrated random reference weights are chaotic, and no other engine reproduces them to 4 px),
    else ``model``'s. Timing does not depend on which weights ran the gate."""
    from ditepose.model.engines.select import build_chosen_engine

    judged = model
    if arch == "dite_hrnet_18" and DEMO_CHECKPOINT.is_file():
        judged = build_model(arch)
        load_checkpoint(judged, DEMO_CHECKPOINT)
        judged.eval()
    engine, choice = build_chosen_engine(judged, "cpu", "auto", "auto", input_hw)
    print(f"{arch}: default CPU engine = {choice.backend} {choice.precision} ({choice.reason})", flush=True)
    return engine


def openvino_factories(model: torch.nn.Module, batch_sizes: list[int],
                       input_hw: tuple[int, int]) -> dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]]:
    """OpenVINO f32 (and bf16 where the CPU has it): one compiled model per timed batch size, no padding."""
    try:
        from ditepose.model.engines.openvino import OpenVinoEngine, cpu_supports_bf16
    except ImportError:  # openvino not installed: the other paths still run
        return {}
    precisions = ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]
    return {f"openvino {'f32' if p == 'fp32' else p}": lambda p=p: OpenVinoEngine(
        model, precision=p, threads=torch.get_num_threads(), batch_buckets=tuple(batch_sizes), input_hw=input_hw)
        for p in precisions}


def build_paths(arch: str, device: str, input_hw: tuple[int, int], with_onnx: bool, with_compile: bool,
                tmp: Path, streams: int, only: list[str] | None = None,
                precisions: tuple[str, ...] = (), openvino_batches: list[int] | None = None,
                ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The timed paths by name; with ``only``, just those whose name contains one of its parts
    (and the eager baseline): the others are not even built (engine processes take seconds).

    ``precisions``: a "fast, <precision>" path each (autocast); on CUDA every precision, each also
    with CUDA graphs ("fast, fp16, graphs"), unless ``precisions`` names fewer."""
    model = reference_model(arch)

    def eager(x: torch.Tensor, model: torch.nn.Module = model) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.to(device)).cpu()

    model.to(device)
    model_cpu = reference_model(arch)
    model_cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    fast_cl = build_engine(model_cpu, device, dynamic="fast", channels_last=True)
    factories: dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]] = {
        EAGER: lambda: eager,
        "fused BN, grouped dyn": lambda: build_engine(model_cpu, device, dynamic="grouped", channels_last=False),
        "fused, stacked dyn": lambda: build_engine(model_cpu, device, dynamic="stacked", channels_last=False),
        "fused, fast dyn": lambda: build_engine(model_cpu, device, dynamic="fast", channels_last=False),
        "fused, fast dyn, CL": lambda: fast_cl,
    }
    cuda = device.startswith("cuda")
    for precision in precisions or (PRECISIONS if cuda else ()):
        # CPU: autocast too (bf16 pays off on CPUs with AMX); CUDA graphs are CUDA-only
        for graphs in (False, True) if cuda else (False,):
            name = f"fast, {precision}" + (", graphs" if graphs else "")
            factories[name] = lambda p=precision, g=graphs: build_engine(model_cpu, device, p, cuda_graphs=g)
    if not cuda and streams > 1:
        factories[f"eager, {streams} streams x 1 thread"] = lambda: Streams(eager, streams, 1)
        factories[f"fast CL, {streams} streams x 1 thread"] = lambda: Streams(fast_cl, streams, 1)
        # the same with each stream's engine in a child process: no GIL shared (DITEPOSE_WORKER_PROCESSES)
        factories[f"fast CL, {streams} processes x 1 thread"] = lambda: Streams(
            [build_engine(model_cpu, "cpu", process=True, threads=1) for _ in range(streams)], streams, 1)
    if with_compile:
        factories["fast CL + torch.compile"] = lambda: build_engine(model_cpu, device, compile=True,
                                                                    channels_last=True)
    if with_onnx and device == "cpu":
        def onnx() -> Callable[[torch.Tensor], torch.Tensor]:
            from ditepose.model.export import export_onnx

            onnx_path = export_onnx(model_cpu, tmp / f"{arch}.onnx", input_hw)
            return build_engine(onnx_path, backend="onnxruntime", threads=torch.get_num_threads())

        factories["onnxruntime (stacked)"] = onnx
    if openvino_batches and device == "cpu":
        factories.update(openvino_factories(model_cpu, openvino_batches, input_hw))
        if streams > 1 and any(name.startswith("openvino") for name in factories):
            # the service's CPU layout with OpenVINO: one latency-mode engine of 1 thread per worker thread
            # (DITEPOSE_WORKERS_PER_DEVICE=N, DITEPOSE_TORCH_THREADS=1), vs. the one engine of N threads above
            from ditepose.model.engines.openvino import OpenVinoEngine

            factories[f"openvino f32, {streams} streams x 1 thread"] = lambda: Streams(
                [OpenVinoEngine(model_cpu, threads=1, batch_buckets=tuple(openvino_batches), input_hw=input_hw)
                 for _ in range(streams)], streams, 1)
    if device == "cpu":
        factories[DEFAULT_PATH] = lambda: default_engine(arch, model_cpu, input_hw)
    return {name: make() for name, make in factories.items()
            if not only or name == EAGER or any(part in name for part in only)}


def bench_arch(arch: str, device: str, batch_sizes: list[int], rounds: int, input_hw: tuple[int, int],
               with_onnx: bool, with_compile: bool, tmp: Path, streams: int, only: list[str] | None = None,
               quick: bool = False, block_calls: int | None = None, precisions: tuple[str, ...] = (),
               with_openvino: bool = True) -> list[dict]:
    if quick:  # the default engine, OpenVINO and the worker layouts only
        only = only or ["fast dyn, CL", "openvino", "streams", "processes", "default"]
    paths = build_paths(arch, device, input_hw, with_onnx, with_compile, tmp, streams, only, precisions,
                        openvino_batches=batch_sizes if with_openvino else None)
    rows = []
    for bs in batch_sizes:
        x = bench_input(bs, input_hw)
        calls = block_calls or max(2, 16 // bs)  # a block: >= 2 calls and about 16 images
        memory: dict[str, float | None] = {}
        for name, fn in paths.items():  # warm-up (compile, graph capture), then memory
            fn(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn(x)
                memory[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
            else:
                memory[name] = peak_rss_delta_mb(lambda fn=fn, x=x: fn(x))
        times: dict[str, list[float]] = {name: [] for name in paths}
        cpu: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name, fn in paths.items():
                start, start_cpu = time.perf_counter(), cpu_seconds(fn)
                for _ in range(calls):
                    fn(x)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                per_batch = getattr(fn, "streams", 1) * calls
                times[name].append((time.perf_counter() - start) / per_batch)
                cpu[name].append((cpu_seconds(fn) - start_cpu) / per_batch)
        eager_ms = statistics.median(times[EAGER]) * 1000
        eager_cpu = statistics.median(cpu[EAGER]) * 1000
        for name, samples in times.items():
            ms = statistics.median(samples) * 1000
            cpu_ms = statistics.median(cpu[name]) * 1000
            rows.append({
                "arch": arch, "path": name, "batch": bs, "ms_per_batch": round(ms, 2),
                "ms_min": round(min(samples) * 1000, 2), "images_per_s": round(bs * 1000 / ms, 2),
                "speedup_vs_eager": round(eager_ms / ms, 2), "cpu_ms_per_batch": round(cpu_ms, 2),
                "images_per_cpu_s": round(bs * 1000 / cpu_ms, 2), "cpu_speedup_vs_eager": round(eager_cpu / cpu_ms, 2),
                "peak_mem_mb": None if memory[name] is None
                else round(memory[name], 1), "rounds": len(samples), "calls_per_round": calls,
                "streams": getattr(paths[name], "streams", 1),
            })
        print_rows([r for r in rows if r["batch"] == bs])
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        print(f"{r['arch']:<14} {r['path']:<24} {r['batch']:>5} {r['ms_per_batch']:>10.1f} {r['images_per_s']:>9.1f}"
              f" {r['speedup_vs_eager']:>7.2f}x {r['cpu_ms_per_batch']:>9.1f} {r['cpu_speedup_vs_eager']:>7.2f}x"
              f" {mem:>8}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Dite-HRNet-18, small batches, few rounds (< 1 min)")
    parser.add_argument("--json", type=Path, default=None, help=f"output JSON (default {DEFAULT_JSON})")
    parser.add_argument("--archs", nargs="+", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--no-openvino", action="store_true", help="leave out the OpenVINO f32/bf16 paths")
    parser.add_argument("--paths", nargs="+", default=None,
                        help="only paths whose name contains one of these (the eager baseline always runs)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--calls", type=int, default=None, help="calls per path per round (default: ~16 images)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--streams", type=int, default=os.cpu_count() or 1,
                        help="also time N streams x 1 thread on CPU (1: don't)")
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=None,
                        help="a 'fast, <precision>' path each (autocast; default: all on CUDA, each with and "
                             "without CUDA graphs; none on CPU)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    archs = args.archs or (["dite_hrnet_18"] if args.quick else ["dite_hrnet_18", "dite_hrnet_30"])
    if args.quick:
        batch_sizes, rounds = ([1, 64] if cuda else [1, 8]), args.rounds or 3
    else:
        batch_sizes, rounds = ([1, 64, 256] if cuda else [1, 8, 32]), args.rounds or 5
    batch_sizes = args.batch_sizes or batch_sizes
    input_hw = (256, 192)
    print(f"{'arch':<14} {'path':<24} {'batch':>5} {'ms/batch':>10} {'img/s':>9} {'speedup':>8} {'cpu ms':>9}"
          f" {'cpu spd':>8} {'peakMB':>8}")
    started = time.time()
    out = args.json or (DEFAULT_JSON if not cuda else DEFAULT_JSON.with_name("engine_cuda.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            rows += bench_arch(arch, args.device, batch_sizes, rounds, input_hw,
                               with_onnx=not args.no_onnx and not args.quick, with_compile=args.compile,
                               tmp=Path(tmp), streams=args.streams, only=args.paths, quick=args.quick,
                               block_calls=args.calls, precisions=tuple(args.precisions or ()),
                               with_openvino=not args.no_openvino)
            result = {  # written after every arch, so a long run that is stopped keeps its rows
                "device": f"{args.device} ({torch.cuda.get_device_name(torch.device(args.device))})" if cuda
                else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
                "cpu_model": cpu_model(), "openvino": openvino_version(),
                "torch": torch.__version__, "threads": torch.get_num_threads(), "input_hw": list(input_hw),
                "precision": "fp32 unless the path names another (autocast)", "quick": args.quick,
                "timing": "median over rounds of a block of consecutive calls per path: wall clock (ms_per_batch) and "
                          "process CPU time (cpu_ms_per_batch), per batch (a streams path's call is N batches)",
                "load_average_at_end": list(os.getloadavg()), "seconds": round(time.time() - started, 1),
                "memory": "peak RSS delta over one call (MiB)" if not cuda else "max_memory_allocated delta (MiB)",
                "rows": rows,
            }
            out.write_text(json.dumps(result, indent=1) + "\n")
    for row in rows:  # issue 26's bar: the default CPU engine at batch 1 >= 3x the authors' code
        if row["path"] == DEFAULT_PATH and row["batch"] == 1:
            print(f"{row['arch']}: default CPU engine at batch 1 = {row['speedup_vs_eager']:.2f}x the eager graph "
                  f"(our port of the authors' code, ~1.08x theirs): target >= 3x "
                  f"{'met' if row['speedup_vs_eager'] >= 3 else 'NOT met'}")
    print(f"wrote {out} ({round(time.time() - started, 1)} s, load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
