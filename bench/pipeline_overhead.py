"""Pre/post-processing cost of the top-down pipeline per person, without the network.

``python -m bench.pipeline_overhead [--persons 32] [--repeat 30]``: prepare (crop, normalise,
mirror) and finish (flip merge, decode, rescore) for N boxes on a 640x480 image, with random
heatmaps standing in for the network. Prints and saves JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ditepose.model.pipeline import TopDownPipeline


def measure(persons: int, repeat: int, flip: bool, decoder: str, normalize_on_cpu: bool = True) -> dict:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8)
    xy = rng.uniform([0, 0], [540, 280], size=(persons, 2))
    wh = rng.uniform([40, 80], [100, 200], size=(persons, 2))
    boxes = np.concatenate([xy, wh], axis=1).astype(np.float32)
    scores = rng.uniform(0.5, 1.0, size=persons).astype(np.float32)
    pipe = TopDownPipeline((192, 256), flip_test=flip, decoder=decoder, normalize_on_cpu=normalize_on_cpu)
    heatmaps = torch.rand(persons * (2 if flip else 1), 17, 64, 48)
    prep_t, fin_t = [], []
    for _ in range(repeat + 3):
        t0 = time.perf_counter()
        prepared = pipe.prepare(image, boxes, scores)
        t1 = time.perf_counter()
        pipe.finish(prepared, heatmaps)
        t2 = time.perf_counter()
        prep_t.append(t1 - t0)
        fin_t.append(t2 - t1)
    prep_t, fin_t = prep_t[3:], fin_t[3:]  # warm-up
    prep_ms = statistics.median(prep_t) * 1e3
    fin_ms = statistics.median(fin_t) * 1e3
    return {
        "persons": persons,
        "flip_test": flip,
        "decoder": decoder,
        "normalize_on_cpu": normalize_on_cpu,
        "prepare_ms": round(prep_ms, 3),
        "finish_ms": round(fin_ms, 3),
        "prepare_min_ms": round(min(prep_t) * 1e3, 3),
        "finish_min_ms": round(min(fin_t) * 1e3, 3),
        "per_person_ms": round((prep_ms + fin_ms) / persons, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--persons", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="bench/results/pipeline_overhead.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [
        measure(args.persons, args.repeat, flip, decoder)
        for flip in (True, False)
        for decoder in ("default", "dark")
    ]
    rows.append(measure(args.persons, args.repeat, True, "default", normalize_on_cpu=False))
    result = {
        "what": "TopDownPipeline prepare+finish per person, network excluded (median of repeats)",
        "image": "640x480",
        "input": "256x192",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the box skews timings
        },
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
