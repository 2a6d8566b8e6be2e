"""Crop cost per image: the cv2 path against the torch path (model/device_crops.py) on CPU and CUDA.

``python -m bench.crops [--device cuda] [--quick] [--out bench/results/crops.json]``: times
``TopDownPipeline.prepare`` (crop, normalise, mirrored copies for the flip test) for 1, 4 and 16
persons on a 640x480 image at 256x192, per backend, and checks the torch crops against cv2's in
grey levels on the same run. On CUDA it times both ways the crops can leave: back to the CPU
(what every engine takes today) and kept on the device (``crops_on_device``, an engine on that
GPU in this process). Prints a table and saves JSON.

``run(device, quick)`` returns the same document without printing or saving: the GPU check calls it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from ditepose.model.pipeline import TopDownPipeline

PERSONS = (1, 4, 16)
INPUT_WH = (192, 256)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _scene(persons: int) -> tuple[np.ndarray, np.ndarray]:
    """A 640x480 noise image and ``persons`` person-sized boxes, some across the image edges."""
    rng = np.random.default_rng(persons)
    image = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    xy = rng.uniform([-30, -30], [560, 300], size=(persons, 2))
    wh = rng.uniform([40, 80], [140, 260], size=(persons, 2))
    return image, np.concatenate([xy, wh], axis=1).astype(np.float32)


def _time_prepare(pipe: TopDownPipeline, image: np.ndarray, boxes: np.ndarray, repeat: int) -> list[float]:
    sync = pipe.crops_on_device and pipe.crop_device.type == "cuda"
    times = []
    for _ in range(repeat + 3):  # 3 warm-up calls (CUDA context, kernels, allocator)
        t0 = time.perf_counter()
        prepared = pipe.prepare(image, boxes)
        if sync:  # kept on the GPU: the work is queued, not done, until synchronised
            torch.cuda.synchronize(pipe.crop_device)
        times.append(time.perf_counter() - t0)
        del prepared
    return times[3:]


def _max_diff(device: str, image: np.ndarray, boxes: np.ndarray) -> float:
    """Largest |torch - cv2| over the uint8 crops (flip copies included), in grey levels."""
    ref = TopDownPipeline(INPUT_WH, normalize_on_cpu=False).prepare(image, boxes).crops
    got = TopDownPipeline(INPUT_WH, normalize_on_cpu=False, crop_backend="torch", crop_device=device).prepare(
        image, boxes).crops
    return float((got.int() - ref.int()).abs().max())


def _variants(device: str) -> list[tuple[str, str, bool]]:
    """(backend, crop device, crops kept on the device) rows to time for ``device``."""
    rows = [("cv2", "cpu", False), ("torch", "cpu", False)]
    if torch.device(device).type == "cuda":
        rows += [("torch", device, False), ("torch", device, True)]
    return rows


def run(device: str = "cpu", quick: bool = False) -> dict:
    """Time every backend for 1/4/16 persons; ``device`` "cuda[:i]" adds the GPU rows.

    ``quick``: 5 timed calls per row instead of 30 (a smoke check of speed and equality)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device here")
    repeat = 5 if quick else 30
    load_before = os.getloadavg()[0]
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # as PoseService runs cv2 (one small warp per person; threads only add hand-offs)
    try:
        rows = _rows(device, repeat)
    finally:
        cv2.setNumThreads(cv2_threads)
    machine = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cv2_threads": 1,
        "load_average_1min_before": round(load_before, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
    }
    if torch.device(device).type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return {
        "what": "TopDownPipeline.prepare per image (crops + normalisation + flip-test mirrors), median of calls",
        "image": "640x480 uint8 RGB",
        "input": "256x192",
        "flip_test": True,
        "normalised": True,
        "repeat": repeat,
        "opencv": cv2.__version__,
        "torch": torch.__version__,
        "machine": machine,
        "rows": rows,
    }


def _rows(device: str, repeat: int) -> list[dict]:
    rows = []
    for persons in PERSONS:
        image, boxes = _scene(persons)
        diffs = {dev: _max_diff(dev, image, boxes) for dev in {d for b, d, _ in _variants(device) if b == "torch"}}
        base = None
        for backend, crop_device, kept in _variants(device):
            pipe = TopDownPipeline(INPUT_WH, flip_test=True, crop_backend=backend,
                                   crop_device=crop_device if backend == "torch" else None, crops_on_device=kept)
            times = _time_prepare(pipe, image, boxes, repeat)
            ms = statistics.median(times) * 1e3
            base = ms if backend == "cv2" else base
            rows.append({
                "persons": persons,
                "backend": backend,
                "crop_device": crop_device,
                "crops_end_on": crop_device if kept else "cpu",
                "ms_per_image": round(ms, 3),
                "min_ms": round(min(times) * 1e3, 3),
                "vs_cv2": round(base / ms, 2) if base else None,  # > 1: faster than the cv2 path
                "max_abs_diff_grey_levels": diffs.get(crop_device) if backend == "torch" else 0.0,
            })
    return rows


def table(doc: dict) -> str:
    lines = [f"{'persons':>7} {'backend':>7} {'crop on':>8} {'ends on':>8} {'ms/image':>9} {'vs cv2':>7} {'max diff':>8}"]
    for r in doc["rows"]:
        ratio = "" if r["vs_cv2"] is None else f"{r['vs_cv2']:.2f}x"
        lines.append(f"{r['persons']:>7} {r['backend']:>7} {r['crop_device']:>8} {r['crops_end_on']:>8} "
                     f"{r['ms_per_image']:>9.3f} {ratio:>7} {r['max_abs_diff_grey_levels']:>8.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:i] to add the GPU rows")
    parser.add_argument("--quick", action="store_true", help="5 timed calls per row instead of 30")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--note", default="", help="free text saved with the result (e.g. what else ran)")
    parser.add_argument("--out", default="bench/results/crops.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    doc = run(args.device, args.quick)
    if args.note:
        doc["note"] = args.note
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    m = doc["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
          + (f", {m['gpu']}" if "gpu" in m else "")
          + f"; load average {m['load_average_1min_before']} -> {m['load_average_1min_after']}")
    print(table(doc))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
