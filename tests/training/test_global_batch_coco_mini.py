"""Issue 16 on real data: 1 process and 2 gloo processes of the same recipe on coco-mini train.

The same samples per epoch, the same global batch at every step, the same LR at every
iteration; BatchNorm statistics stay per process, as in the authors' runs (8 GPUs, no SyncBN).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from ditepose.model import load_pose_model
from ditepose.training.config import get_config
from tests.service.jobs.support import free_port
from tests.training.conftest import TINY
from tests.training.ddp_run import RecordingTrainer, launch

GLOBAL = 8  # 1 process x 8 vs 2 processes x 4
EPOCHS = 2


def rows(work: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.slow
def test_one_and_two_processes_on_coco_mini_see_the_same_samples_and_lr(coco_mini: Path, tmp_path: Path) -> None:
    # The COCO recipe at 64x64 with the tiny net: warm-up over 6 of the 22 steps, an lr step at epoch 1.
    cfg = get_config("dite_hrnet_18_coco_256x192").replace(
        input_size=(64, 64), global_batch=GLOBAL, epochs=EPOCHS, workers=0, eval_every=0, checkpoint_every=0,
        log_every=1, warmup_iters=6, lr_steps=(1,), model_overrides=TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 processes
    try:
        one = RecordingTrainer(cfg, coco_mini, tmp_path / "one", device="cpu", progress=False)
        assert (one.layout.world_size, one.layout.per_device, one.layout.accumulation) == (1, 8, 1)
        one.fit()
    finally:
        torch.set_num_threads(threads)
    launch(cfg, coco_mini, tmp_path / "two", port=free_port())
    ranks = [json.loads((tmp_path / "two" / f"seen_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]

    # The real samples: every person of coco-mini train with keypoints (86), as COCO annotation ids.
    anns = json.loads((coco_mini / "annotations" / "person_keypoints_train2017.json").read_text())["annotations"]
    people = {a["id"] for a in anns if a.get("num_keypoints", 0) > 0 and not a.get("iscrowd", 0)}
    assert len(one.train_set) == len(people) == 86
    ann_id = [rec["ann_id"] for rec in one.train_set.records]
    steps = (86 + 2) // GLOBAL  # padded to the authors' 8 processes (88), partial batch dropped: 11

    for epoch in range(1, EPOCHS + 1):
        single = one.seen[epoch]
        per_rank = [r["seen"][str(epoch)] for r in ranks]
        assert len(single) == steps and all(len(b) == GLOBAL for b in single)
        assert all(len(mbs) == steps and all(len(b) == GLOBAL // 2 for b in mbs) for mbs in per_rank)
        # step by step, the union of the two processes' halves is the 1-process batch (as a multiset:
        # the padding repeats 2 samples)
        for s in range(steps):
            assert Counter(single[s]) == Counter(per_rank[0][s]) + Counter(per_rank[1][s]), (epoch, s)
        union = {ann_id[i] for mbs in per_rank for b in mbs for i in b}
        assert {ann_id[i] for b in single for i in b} == union == people  # the same samples, all of them
    assert one.seen[1] != one.seen[2]  # each epoch draws its own order

    # The same LR at every iteration: what each optimizer held, and what the logs say.
    assert len(one.step_lrs) == EPOCHS * steps
    assert one.step_lrs == ranks[0]["lrs"] == ranks[1]["lrs"]
    assert len(set(one.step_lrs)) >= 7  # 6 warm-up values, the peak, and the x0.1 step of epoch 1
    logged = {w: [(r["iter"], r["lr"]) for r in rows(tmp_path / w, "train")] for w in ("one", "two")}
    assert logged["one"] == logged["two"] and len(logged["one"]) == EPOCHS * steps
    epochs = {w: [(r["steps"], r["images"], r["batches_sha1"]) for r in rows(tmp_path / w, "epoch")]
              for w in ("one", "two")}
    assert epochs["one"] == epochs["two"] and all(images == steps * GLOBAL for _, images, _ in epochs["one"])
    _, meta = load_pose_model(tmp_path / "two" / "final.pt")
    assert meta.extra["layout"] == {"global_batch": GLOBAL, "world_size": 2, "per_device": 4, "accumulation": 1}

    # DDP keeps the weights identical across the processes; BatchNorm statistics stay per process.
    rank0, rank1 = (torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    weights = [k for k, v in rank0.items() if v.dtype.is_floating_point and "running_" not in k]
    assert weights and all(torch.equal(rank0[k], rank1[k]) for k in weights)
    for stat in ("running_mean", "running_var"):
        keys = [k for k in rank0 if k.endswith(stat)]
        assert keys and sum(not torch.equal(rank0[k], rank1[k]) for k in keys) > 0.9 * len(keys), stat
