"""Person detectors on coco-mini val: recall, false positives, person-box AP and time per image.

    .venv/bin/python bench/detector.py            # table on stdout, bench/results/detector.json
    .venv/bin/python bench/detector.py --detectors nanodet,nanodet-openvino --out /tmp/d.json

The figures are :func:`ditepose.training.detection_eval.evaluate_detector`'s (the report that
``ditepose evaluate --boxes detector`` and ``ditepose evaluate-detector`` print), on every val image:
targets are the non-crowd persons with at least 5 labelled joints (57 on coco-mini val); a target is
found by a box with IoU >= 0.5. A false positive is a box whose IoU with every person of the image
(crowd and few-joint ones included) is below 0.5. Person-box AP is pycocotools' bbox AP over all
person annotations, from each detector's boxes at the service's threshold. Time: one image at a
time, one torch thread, median over the set, on this machine.

``nanodet-openvino`` (and ``nanodet-openvino-bf16`` on a CPU with bf16) is the same detector with
its network and box decoding on OpenVINO
(:class:`~ditepose.model.engines.openvino_nanodet.OpenVinoNanoDetDetector`, one thread, batch 1,
compiled before the timed pass): same thresholds, so its recall and false positives must match
``nanodet``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.shared import REPO_ROOT, shared_file
from ditepose.model.detectors import PersonDetector, build_detector
from ditepose.training.detection_eval import evaluate_detector

OPENVINO_DETECTORS = {"nanodet-openvino": "fp32", "nanodet-openvino-bf16": "bf16"}


def openvino_available(bf16: bool = False) -> bool:
    try:
        from ditepose.model.engines.openvino import cpu_supports_bf16
    except ImportError:
        return False
    return cpu_supports_bf16() if bf16 else True


def make_detector(name: str) -> PersonDetector:
    """``build_detector(name)``, or NanoDet on OpenVINO for the names of :data:`OPENVINO_DETECTORS`."""
    if name not in OPENVINO_DETECTORS:
        return build_detector(name)
    from ditepose.model.engines.openvino_nanodet import OpenVinoNanoDetDetector

    detector = OpenVinoNanoDetDetector(precision=OPENVINO_DETECTORS[name], threads=1, batch_buckets=(1,))
    detector.runner.warmup()  # compile (or load) outside the timed images
    return detector


def evaluate(name: str, data: Path) -> dict:
    """One row of the table: the library's report, under this bench's (older) key names."""
    report = evaluate_detector(make_detector(name), data / "annotations" / "person_keypoints_val2017.json",
                               data / "val2017", batch_size=1)
    return {"detector": name, "targets": report["targets"], "found": report["found"],
            "recall": round(report["recall_at_iou50"], 3), "false_positives": report["false_positives"],
            "fp_per_image": round(report["false_positives_per_image"], 2), "bbox_ap": round(report["bbox_ap"], 3),
            "bbox_ap50": round(report["bbox_ap50"], 3), "ms_per_image_median": round(report["ms_per_image_median"], 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", default=None,
                        help="comma-separated (default: nanodet, nanodet-openvino[-bf16] where available, hog, whole)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "detector.json")
    args = parser.parse_args(argv)
    data = shared_file("data", "coco-mini")
    if data is None:
        print("bench/detector.py needs ../shared/data/coco-mini", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    ann = json.loads((data / "annotations" / "person_keypoints_val2017.json").read_text())
    names = args.detectors.split(",") if args.detectors else [
        "nanodet", *(["nanodet-openvino"] if openvino_available() else []),
        *(["nanodet-openvino-bf16"] if openvino_available(bf16=True) else []), "hog", "whole"]
    rows = [evaluate(name, data) for name in names]
    print(f"{'detector':22} {'found':>9} {'recall':>7} {'FP':>5} {'FP/img':>7} {'AP':>6} {'AP50':>6} {'ms/img':>7}")
    for r in rows:
        print(f"{r['detector']:22} {r['found']:>4}/{r['targets']:<4} {r['recall']:>7.3f} {r['false_positives']:>5} "
              f"{r['fp_per_image']:>7.2f} {r['bbox_ap']:>6.3f} {r['bbox_ap50']:>6.3f} {r['ms_per_image_median']:>7.1f}")
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread"
    load = os.getloadavg()[0]
    doc = {"machine": machine, "load_average_1m": round(load, 2), "images": len(ann["images"]),
           "data": "coco-mini val2017", "rows": rows}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{machine}; load average {load:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
