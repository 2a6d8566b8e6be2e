"""Overfit Dite-HRNet-18 on coco-mini train (real photos, GT boxes) and watch train-set AP rise.

Not a test: a figure that the whole training path (dataset -> targets -> loss -> Adam ->
flip-test decoding -> mmpose-protocol COCO AP) learns. Kept feasible on 2 CPU cores:
input 128x96, no augmentation (crops are cached), Adam with a short warm-up.
Writes bench/results/overfit_coco_mini.json and a .log beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.shared import shared_file  # noqa: E402
from ditepose.model import build_model  # noqa: E402
from ditepose.model.pipeline import module_infer  # noqa: E402
from ditepose.training.augment import AugmentConfig  # noqa: E402
from ditepose.training.datasets import CocoKeypointDataset  # noqa: E402
from ditepose.training.evaluate import pipeline_for, predict, score  # noqa: E402
from ditepose.training.loss import JointsMSELoss  # noqa: E402


def find_coco_mini() -> Path:
    found = shared_file("data", "coco-mini")
    if found is None:
        raise FileNotFoundError("coco-mini not found in ../shared/data or /work/shared/data")
    return found


class Cached(torch.utils.data.Dataset):
    """Samples of a no-augmentation dataset, computed once."""

    def __init__(self, ds: CocoKeypointDataset) -> None:
        self.items = [ds[i] for i in range(len(ds))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-people", type=int, default=None)
    ap.add_argument("--input", default="96x128", help="W x H")
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-minutes", type=float, default=30.0)
    ap.add_argument("--eval-every", type=int, default=20, help="epochs")
    ap.add_argument("--target-ap", type=float, default=0.5)
    ap.add_argument("--extra-evals", type=int, default=1, help="evaluations after reaching the target")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "overfit_coco_mini.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.input.lower().split("x"))
    root = find_coco_mini()
    ds = CocoKeypointDataset(root / "annotations" / "person_keypoints_train2017.json", root / "train2017",
                             (w, h), train=False, recipe=AugmentConfig.none(), max_people=args.max_people)
    cached = Cached(ds)
    loader = torch.utils.data.DataLoader(cached, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0), drop_last=False)
    model = build_model("dite_hrnet_18", num_joints=17)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: min(1.0, 0.001 + (1 - 0.001) * it / warmup))
    crit = JointsMSELoss()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(out_path.with_suffix(".log"), "w")  # noqa: SIM115

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    def evaluate() -> dict[str, float]:
        """No-flip AP is the headline (the model never saw mirrored crops); flip-test AP is reported too."""
        was_training = model.training
        try:
            table = score(ds, predict(module_infer(model), ds, pipeline_for(ds, flip_test=False), 32))
            table["AP_flip_test"] = score(ds, predict(module_infer(model), ds, pipeline_for(ds, flip_test=True), 32))["AP"]
        finally:
            model.train(was_training)
        return table

    t0 = time.time()
    curve = []
    initial = evaluate()
    curve.append({"epoch": 0, "seconds": 0.0, "AP": initial["AP"], "loss": None})
    say(f"people={len(ds)} input={w}x{h} lr={args.lr} initial AP={initial['AP']:.4f}")
    epoch, it, reached, final = 0, 0, 0, initial
    while time.time() - t0 < args.max_minutes * 60:
        epoch += 1
        model.train()
        losses = []
        for batch in loader:
            loss = crit(model(batch["input"]), batch["target"], batch["target_weight"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            it += 1
            losses.append(loss.item())
        if epoch % args.eval_every == 0:
            final = evaluate()
            curve.append({"epoch": epoch, "seconds": round(time.time() - t0, 1), "AP": final["AP"],
                          "loss": float(np.mean(losses))})
            say(f"epoch {epoch} iter {it} loss {np.mean(losses):.6f} AP {final['AP']:.4f} "
                f"AP50 {final['AP50']:.4f} AP(flip test) {final['AP_flip_test']:.4f} t={time.time() - t0:.0f}s")
            if final["AP"] >= args.target_ap:
                reached += 1
                if reached > args.extra_evals:
                    break
    result = {
        "what": "Dite-HRNet-18 overfit on coco-mini train2017, GT boxes, train-set COCO AP (mmpose protocol, no flip; flip-test AP beside it), scored on the images those people come from",
        "device": "cpu", "threads": torch.get_num_threads(), "people": len(ds), "input_wh": [w, h],
        "lr": args.lr, "batch_size": args.batch_size, "augmentation": "none", "epochs": epoch, "iterations": it,
        "seconds": round(time.time() - t0, 1), "initial_AP": initial["AP"], "final": final,
        "reached_target": final["AP"] >= args.target_ap, "target_AP": args.target_ap, "curve": curve,
    }
    out_path.write_text(json.dumps(result, indent=2))
    say(json.dumps({k: result[k] for k in ("initial_AP", "epochs", "seconds", "reached_target")}))
    say(f"final: {json.dumps(final)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
