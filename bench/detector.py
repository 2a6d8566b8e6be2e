"""Person detectors on coco-mini val: recall, false positives, person-box AP and time per image.

    .venv/bin/python bench/detector.py            # table on stdout, bench/results/detector.json

Targets: the non-crowd persons with at least 5 labelled joints (57 on coco-mini val); a target is
found by a box with IoU >= 0.5. A false positive is a box whose IoU with every person of the image
(crowd and few-joint ones included) is below 0.5. Person-box AP is pycocotools' bbox AP over all
person annotations, from each detector's boxes at the service's threshold. Time: one image at a
time, one torch thread, median over the set, on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.shared import REPO_ROOT, shared_file
from ditepose.model.detectors import build_detector


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / max(a[2] * a[3] + b[2] * b[3] - w * h, 1e-9)


def evaluate(name: str, data: Path, ann: dict) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    detector = build_detector(name)
    by_image: dict[int, list[dict]] = {}
    for a in ann["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    targets = found = false_pos = 0
    times, dets = [], []
    for image in ann["images"]:
        rgb = cv2.cvtColor(cv2.imread(str(data / "val2017" / image["file_name"])), cv2.COLOR_BGR2RGB)
        start = time.perf_counter()
        boxes, scores = detector.detect(rgb)
        times.append(time.perf_counter() - start)
        people = by_image.get(image["id"], [])
        goals = [np.asarray(a["bbox"]) for a in people if not a["iscrowd"] and a["num_keypoints"] >= 5]
        targets += len(goals)
        found += sum(any(_iou(g, b) >= 0.5 for b in boxes) for g in goals)
        false_pos += sum(not any(_iou(b, np.asarray(a["bbox"])) >= 0.5 for a in people) for b in boxes)
        dets += [{"image_id": image["id"], "category_id": 1, "bbox": [float(v) for v in b], "score": float(s)}
                 for b, s in zip(boxes, scores, strict=True)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(data / "annotations" / "person_keypoints_val2017.json"))
        ev = COCOeval(gt, gt.loadRes(dets) if dets else gt.loadRes([]), "bbox")
        ev.params.catIds = [1]
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return {"detector": name, "targets": targets, "found": found, "recall": round(found / targets, 3),
            "false_positives": false_pos, "fp_per_image": round(false_pos / len(ann["images"]), 2),
            "bbox_ap": round(float(ev.stats[0]), 3), "bbox_ap50": round(float(ev.stats[1]), 3),
            "ms_per_image_median": round(1000 * statistics.median(times), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", default="nanodet,hog,whole")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "detector.json")
    args = parser.parse_args(argv)
    data = shared_file("data", "coco-mini")
    if data is None:
        print("bench/detector.py needs ../shared/data/coco-mini", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    ann = json.loads((data / "annotations" / "person_keypoints_val2017.json").read_text())
    rows = [evaluate(name, data, ann) for name in args.detectors.split(",")]
    print(f"{'detector':10} {'found':>9} {'recall':>7} {'FP':>5} {'FP/img':>7} {'AP':>6} {'AP50':>6} {'ms/img':>7}")
    for r in rows:
        print(f"{r['detector']:10} {r['found']:>4}/{r['targets']:<4} {r['recall']:>7.3f} {r['false_positives']:>5} "
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
