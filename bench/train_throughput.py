"""Training throughput on this machine: images/s and data-loader wait per epoch.

``python bench/train_throughput.py [--workers 6] [--loader-workers 6 2 0] [--steps 1] [--device cpu]
[--amp bf16] [--batch-size 32] [--input-size 256x192]`` -> ``bench/results/train_throughput.json``
(and a table on stdout).

The recipe is the authors' ``dite_hrnet_18_coco_256x192`` (full Dite-HRNet-18, 256x192, fp32, the
full train augmentation) on synthetic COCO-sized data (``ditepose synth`` people rescaled to
640x480 JPEGs, COCO's common size), with one GPU's share of the global batch: 32 samples per step
(the authors' per-GPU batch) unless ``--batch-size`` says otherwise; ``--amp`` trains under
autocast (the recipe's ``amp``), ``--input-size`` shrinks the network input (smoke runs). Each worker count runs 2 epochs of ``--steps`` steps through the
real ``Trainer`` (the numbers are the ones it prints and logs); the table reports the second
epoch (the first pays one-time costs). A loader-only pass (no model) shows how many images/s the
input pipeline alone delivers at 6, 2 and 0 workers. Loader wait is the time the training loop
spent blocked on the next batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ditepose.cli import parse_size  # noqa: E402
from ditepose.training.config import AMP_MODES, get_config  # noqa: E402
from ditepose.training.data_layout import find_split  # noqa: E402
from ditepose.training.synth import synthesize  # noqa: E402
from ditepose.training.trainer import Trainer  # noqa: E402

RECIPE = "dite_hrnet_18_coco_256x192"
PER_GPU_BATCH = 32
COCO_WH = (640, 480)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{os.cpu_count()}-core {cpu} CPU, {platform.system()}, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def coco_sized(out: Path, num_images: int) -> Path:
    """``ditepose synth`` COCO data with every image resized to 640x480 (boxes and joints scaled)."""
    ann_file = synthesize("coco", out, num_images, seed=7)
    data = json.loads(ann_file.read_text())
    img_dir = find_split(out, "coco", "train").img_dir
    by_id = {}
    for info in data["images"]:
        sx, sy = COCO_WH[0] / info["width"], COCO_WH[1] / info["height"]
        path = img_dir / info["file_name"]
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), COCO_WH, interpolation=cv2.INTER_LINEAR),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        info["width"], info["height"] = COCO_WH
        by_id[info["id"]] = (sx, sy)
    for ann in data["annotations"]:
        sx, sy = by_id[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x * sx, y * sy, w * sx, h * sy]
        ann["area"] = ann["area"] * sx * sy
        k = ann["keypoints"]
        ann["keypoints"] = [v * (sx if i % 3 == 0 else sy if i % 3 == 1 else 1) for i, v in enumerate(k)]
        ann["segmentation"] = [[v * (sx if i % 2 == 0 else sy) for i, v in enumerate(ann["segmentation"][0])]]
    ann_file.write_text(json.dumps(data))
    return out


def loader_only(trainer: Trainer) -> dict[str, float]:
    """Images/s of the input pipeline alone (the trainer's own loader, nothing consuming)."""
    start = time.perf_counter()
    first = None
    images = 0
    for batch in trainer._loader():
        images += len(batch["index"])
        if first is None:
            first = time.perf_counter() - start
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 2),
            "first_batch_s": round(first or 0.0, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts to train with (default: the recipe's 6)")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=None,
                        help="worker counts for the loader-only pass (default: the recipe's 6, 2 and 0)")
    parser.add_argument("--steps", type=int, default=1,
                        help="steps of 32 per epoch (1: a step takes 10-60 s on 2 shared cores)")
    parser.add_argument("--loader-batches", type=int, default=8, help="batches of 32 in the loader-only pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=AMP_MODES, default="none", help="autocast dtype ('none': fp32)")
    parser.add_argument("--batch-size", type=int, default=PER_GPU_BATCH, help="samples per step")
    parser.add_argument("--input-size", type=parse_size, default=None,
                        help="network input HxW, as the paper writes it (default: the recipe's 256x192)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_throughput.json"))
    args = parser.parse_args(argv)
    batch = args.batch_size
    recipe = get_config(RECIPE).replace(amp=args.amp)
    if args.input_size is not None:
        recipe = recipe.replace(input_size=args.input_size)
    workers = args.workers or [recipe.workers]
    loader_workers = args.loader_workers or [recipe.workers, 2, 0]
    load_before = os.getloadavg()
    people = args.steps * batch
    started = time.perf_counter()
    results, loader_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        loader_people = args.loader_batches * batch
        data = coco_sized(Path(tmp) / "data", num_images=max(people, loader_people) // 2 + 8)

        def recipe_for(w: int, max_people: int = people):
            return recipe.replace(global_batch=batch, epochs=2, max_people=max_people, workers=w,
                                  eval_every=0, checkpoint_every=0, log_every=10**6)

        for w in loader_workers:
            trainer = Trainer(recipe_for(w, loader_people), data, Path(tmp) / f"loader{w}", device=args.device, progress=False)
            loader_rows.append({"workers": w, **loader_only(trainer)})
            print(f"loader alone, {w} workers: {loader_rows[-1]['images_per_s']} img/s", flush=True)
        for w in workers:
            trainer = Trainer(recipe_for(w), data, Path(tmp) / f"work{w}", device=args.device, progress=False)
            summary = trainer.fit()
            epochs = summary["throughput"]
            row = {"workers": w, "default": w == recipe.workers, "epochs": epochs,
                   **{k: epochs[-1][k] for k in ("images_per_s", "loader_wait_s", "loader_wait_frac")},
                   "seconds_per_step": round(epochs[-1]["seconds"] / epochs[-1]["steps"], 2)}
            results.append(row)
            print(f"training, {w} workers: {row['images_per_s']} img/s, loader wait {row['loader_wait_s']} s "
                  f"({100 * row['loader_wait_frac']:.0f}%)", flush=True)
    report = {
        "what": f"{RECIPE} (full Dite-HRNet-18, {recipe.input_size[1]}x{recipe.input_size[0]}, "
                f"{'fp32' if args.amp == 'none' else args.amp + ' autocast'}, the authors' train augmentation) "
                f"trained by the project's Trainer on synthetic COCO-sized data (640x480 JPEGs); {batch} samples "
                f"per step (32: one of the authors' 8 GPUs' share of the global 256); {args.steps} step(s) per "
                "epoch, 2 epochs, "
                "the second reported (the first pays one-time costs; each epoch starts its workers afresh); "
                f"loader_alone: the trainer's loader over {args.loader_batches} batches with nothing consuming it",
        "machine": machine(), "device": args.device, "amp": args.amp, "batch_size": batch,
        "input_wh": list(recipe.input_size), "torch_threads": torch.get_num_threads(),
        "recipe_workers": recipe.workers, "training": results, "loader_alone": loader_rows,
        "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "seconds": round(time.perf_counter() - started, 1),
        "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['machine']}; device {args.device}; amp {args.amp}; {batch} samples/step")
    print("| workers | training img/s | s/step | loader wait per epoch (share) | loader alone img/s |")
    print("|---|---|---|---|---|")
    alone = {r["workers"]: r["images_per_s"] for r in loader_rows}
    for r in results:
        tag = " (recipe default)" if r["default"] else ""
        print(f"| {r['workers']}{tag} | {r['images_per_s']} | {r['seconds_per_step']} | {r['loader_wait_s']} s "
              f"({100 * r['loader_wait_frac']:.1f}%) | {alone.get(r['workers'], '')} |")
    for w, v in alone.items():
        if w not in workers:
            print(f"| {w} | | | | {v} |")


if __name__ == "__main__":
    main()
