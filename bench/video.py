"""Frames per second of the offline video runner (service/video/offline.py) on the riders clip.

One pass per mode, no server: decode (PyAV) -> NanoDet every frame or every 5th -> carried boxes
between -> the shipped demo checkpoint without flip test -> tracker. Besides frames/s it splits
the time by stage (decode alone, detector calls, pose network calls; the rest is crops, heatmap
decoding, carry and tracking) so the table says what dominates, and it reports the time to the
first frame's result (model loading excluded, printed apart).

The issue's goal is a 3-person 640x360 clip at >= 25 frames/s on the 2-core machine with
detection every 5th frame and no flip test; the riders clip is 640x360 with 2 riders (NanoDet
adds a third box for one rider with her horse's head, so 3 crops on detected frames).

Run: ``python bench/video.py [--machine WORDS]``; writes ``bench/results/video.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


class Timed:
    """Wraps a callable and adds up the seconds spent in it."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


class TimedDetector:
    """A person detector whose ``detect`` calls are timed."""

    def __init__(self, detector: Any) -> None:
        self.detect = Timed(detector.detect)


def one_pass(clip: Path, model: Any, detector: Any, interval: int) -> dict[str, Any]:
    from dataclasses import replace

    from ditepose.service.video.decode import probe
    from ditepose.service.video.offline import SegmentRunner, VideoOptions
    from ditepose.service.video.stitch import SegmentPlan

    frames = probe(clip).frames
    infer = Timed(model.infer)
    timed_model = replace(model, infer=infer)
    timed_detector = TimedDetector(detector)
    runner = SegmentRunner(timed_model, timed_detector, VideoOptions(detect_interval=interval, flip_test=False))
    started = time.perf_counter()
    first: list[float] = []
    result = runner.run(clip, SegmentPlan(0, 0, frames),
                        on_frame=lambda i: first.append(time.perf_counter() - started) if not first else None)
    total = time.perf_counter() - started
    crops = sum(len(t) for t in result.tracks)
    return {
        "detect_interval": interval, "frames": frames, "seconds": round(total, 2),
        "frames_per_s": round(frames / total, 2), "ms_per_frame": round(1000 * total / frames, 1),
        "first_result_s": round(first[0], 3), "tracks": len(result.tracks), "crops": crops,
        "detector_calls": timed_detector.detect.calls, "detector_s": round(timed_detector.detect.seconds, 2),
        "pose_network_s": round(infer.seconds, 2),
        "other_s": round(total - timed_detector.detect.seconds - infer.seconds, 2),
    }


def decode_seconds(clip: Path) -> float:
    from ditepose.service.video.decode import decode_frames

    start = time.perf_counter()
    for _ in decode_frames(clip):
        pass
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default="", help="words naming the machine, stored with the figures")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "video.json")
    args = parser.parse_args(argv)
    from ditepose.model.defaults import default_checkpoint_path
    from ditepose.model.detectors import build_detector
    from ditepose.service.video.offline import load_video_model
    from ditepose.service.video.synthetic import write_riders_clip

    checkpoint = default_checkpoint_path()
    if checkpoint is None:
        print("no shipped demo checkpoint in this checkout", file=sys.stderr)
        return 1
    machine = args.machine or f"{os.cpu_count()}-core {platform.machine()} machine"
    with tempfile.TemporaryDirectory() as folder:
        clip = Path(folder) / "riders.mp4"
        write_riders_clip(clip)
        started = time.perf_counter()
        model = load_video_model(checkpoint)
        detector = build_detector("nanodet")
        load_s = time.perf_counter() - started
        decode_s = decode_seconds(clip)
        runs = [one_pass(clip, model, detector, interval) for interval in (1, 5)]
    print(f"{machine}; {checkpoint.name}, riders clip 640x360, 90 frames, flip test off, "
          f"torch threads {torch.get_num_threads()}; model+detector load {load_s:.1f} s; "
          f"decode alone {1000 * decode_s / 90:.1f} ms/frame")
    header = ("detect every", "frames/s", "ms/frame", "first (s)", "detector s", "pose net s", "other s", "tracks")
    print(" | ".join(header))
    for r in runs:
        print(" | ".join(str(v) for v in (r["detect_interval"], r["frames_per_s"], r["ms_per_frame"],
                                           r["first_result_s"], r["detector_s"], r["pose_network_s"],
                                           r["other_s"], r["tracks"])))
    every5 = runs[1]["frames_per_s"]
    print(f"goal 25 frames/s (detection every 5th, no flip test): {every5} frames/s, "
          f"{25 / every5:.1f}x short" if every5 < 25 else f"goal 25 frames/s met: {every5}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine,
        "machine_detail": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()},
        "checkpoint": checkpoint.name, "clip": "riders pan-and-zoom, 640x360, 90 frames, H.264",
        "flip_test": False, "load_s": round(load_s, 2), "decode_ms_per_frame": round(1000 * decode_s / 90, 2),
        "runs": runs, "goal_frames_per_s": 25,
        "mean_crops_per_frame": [round(r["crops"] / r["frames"], 2) for r in runs],
        "numpy": np.__version__, "torch": torch.__version__,
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
