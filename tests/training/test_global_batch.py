"""The global batch in real runs: 1 vs 2 processes (gloo), accumulation, resume, amp, the test protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditepose.model import load_pose_model
from ditepose.training.config import get_config
from ditepose.training.data_layout import find_split
from ditepose.training.trainer import Trainer
from tests.conftest import REPO_ROOT
from tests.service.jobs.support import free_port
from tests.training.conftest import TINY, synth_set


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_set(tmp_path_factory, "synth_global_batch", 6, 2, 21)


def recipe(**kw: object):
    """The COCO recipe shrunk to seconds: global batch 4, warm-up over 3 steps, an LR step at epoch 1."""
    base = dict(input_size=(64, 64), global_batch=4, epochs=2, workers=0, eval_every=0, log_every=1,
                max_people=8, warmup_iters=3, lr_steps=(1,), model_overrides=TINY)
    base.update(kw)
    return get_config("dite_hrnet_18_coco_256x192").replace(**base)


def rows(work: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def torchrun(cfg, data: Path, work: Path, port: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), str(REPO_ROOT / "tests" / "training" / "ddp_run.py"), json.dumps(cfg.to_dict()),
                        str(data), str(work)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_one_and_two_processes_see_the_same_global_batches(data: Path, tmp_path: Path) -> None:
    cfg = recipe()
    threads = torch.get_num_threads()
    # One thread, as each torchrun rank has: a different thread count reorders the float sums
    # of the convolutions, and the runs below are compared to 1e-6.
    torch.set_num_threads(1)
    try:
        one = Trainer(cfg, data, tmp_path / "one", device="cpu", progress=False)
        assert (one.layout.per_device, one.layout.accumulation) == (4, 1)
        one.fit()
        accumulated = Trainer(cfg.replace(per_device_batch=2), data, tmp_path / "accum", device="cpu",
                              progress=False)
        assert (accumulated.layout.per_device, accumulated.layout.accumulation) == (2, 2)
        accumulated.fit()
    finally:
        torch.set_num_threads(threads)
    torchrun(cfg, data, tmp_path / "two", port=free_port())  # 2 processes x 2 samples

    runs = {name: tmp_path / name for name in ("one", "accum", "two")}
    epochs = {name: [(r["steps"], r["images"], r["batches_sha1"]) for r in rows(w, "epoch")] for name, w in runs.items()}
    assert epochs["one"] == epochs["accum"] == epochs["two"]  # the same samples, batch for batch
    assert len(epochs["one"]) == 2 and all(images == steps * 4 for steps, images, _ in epochs["one"])
    lrs = {name: [(r["iter"], r["lr"]) for r in rows(w, "train")] for name, w in runs.items()}
    assert lrs["one"] == lrs["accum"] == lrs["two"]  # the same LR at every iteration
    assert len({lr for _, lr in lrs["one"]}) >= 4  # warm-up and the step at epoch 1 both happened

    # 1 process x 2 micro-batches computes what 2 processes x 2 compute: the same lanes, BN per lane
    losses = {name: [r["loss"] for r in rows(w, "train")] for name, w in runs.items()}
    assert losses["accum"] == pytest.approx(losses["two"], rel=1e-6)
    assert losses["one"] != losses["two"]  # there BatchNorm normalises over 4 samples, not 2
    rank0, rank1 = (torch.load(runs["two"] / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    accum_state = accumulated.model.state_dict()
    for key, value in rank0.items():
        if "running_" in key:  # BatchNorm statistics stay per process, as in the authors' runs
            continue
        assert torch.equal(value, rank1[key]), key  # DDP keeps the weights identical
        if value.dtype.is_floating_point:
            assert torch.allclose(value, accum_state[key], atol=1e-5, rtol=1e-4), key
    bn = [k for k in rank0 if k.endswith("running_mean")]
    assert bn and sum(not torch.equal(rank0[k], rank1[k]) for k in bn) > len(bn) // 2
    _, meta = load_pose_model(runs["two"] / "final.pt")
    assert meta.extra["layout"] == {"global_batch": 4, "world_size": 2, "per_device": 2, "accumulation": 1}


def test_resume_is_bit_identical_with_accumulation(data: Path, tmp_path: Path) -> None:
    cfg = recipe(per_device_batch=2)
    full = Trainer(cfg, data, tmp_path / "full", device="cpu", progress=False)
    full.fit()
    Trainer(cfg.replace(max_iters=3), data, tmp_path / "part", device="cpu", progress=False).fit()
    resumed = Trainer(cfg, data, tmp_path / "part", device="cpu", resume=True, progress=False)
    assert (resumed.epoch, resumed.iter_in_epoch, resumed.global_iter) == (1, 1, 3)
    resumed.fit()
    losses = [[(r["iter"], r["lr"], r["loss"]) for r in rows(tmp_path / w, "train")] for w in ("full", "part")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # A different layout may resume (the global batches are the same); a different global batch may not.
    Trainer(cfg.replace(per_device_batch=None), data, tmp_path / "part", device="cpu", resume=True, progress=False)
    with pytest.raises(ValueError, match="global_batch"):
        Trainer(cfg.replace(global_batch=2, per_device_batch=None), data, tmp_path / "part", device="cpu",
                resume=True, progress=False)


def test_too_few_samples_for_one_global_batch_is_an_error(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="global batch of 256"):
        Trainer(recipe(global_batch=256), data, tmp_path / "w", device="cpu", progress=False)


def test_bf16_is_opt_in_and_recorded(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp16"):
        Trainer(recipe(amp="fp16"), data, tmp_path / "fp16", device="cpu", progress=False)
    trainer = Trainer(recipe(amp="bf16", epochs=1), data, tmp_path / "bf16", device="cpu", progress=False)
    summary = trainer.fit()
    assert summary["amp"] == "bf16" and summary["differs_from_authors"]["amp"]["authors"] == "none"
    _, meta = load_pose_model(tmp_path / "bf16" / "final.pt")
    assert meta.extra["amp"] == "bf16" and meta.extra["differs_from_authors"]["amp"]["now"] == "bf16"
    recorded = json.loads((tmp_path / "bf16" / "recipe.json").read_text())
    assert recorded["reproduces"].endswith("configs/top_down/dite_hrnet/coco/ditehrnet_18_coco_256x192.py")
    assert recorded["amp"] == "bf16" and recorded["layout"]["accumulation"] == 1


def test_end_of_training_test_uses_the_detections_file(data: Path, tmp_path: Path) -> None:
    """Periodic validation on GT boxes; the final test on the recipe's detections file when it exists."""
    val = json.loads(find_split(data, "coco", "val").ann_file.read_text())
    dets = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 0.9, "category_id": 1} for a in val["annotations"]]
    dets += [{"image_id": val["images"][0]["id"], "bbox": [0, 0, 10, 10], "score": 0.05, "category_id": 1}]
    det_dir = tmp_path / "dets"
    det_dir.mkdir()
    (det_dir / "COCO_val2017_detections_AP_H_56_person.json").write_text(json.dumps(dets))
    cfg = recipe(epochs=1, eval_every=1, det_file=str(det_dir / "COCO_val2017_detections_AP_H_56_person.json"))
    summary = Trainer(cfg, data, tmp_path / "work", device="cpu", progress=False).fit()
    assert summary["validation"]["boxes"] == "gt" and set(summary["validation"]["metrics"]) >= {"AP", "AR"}
    assert summary["test"]["boxes"] == f"detections:{det_dir / 'COCO_val2017_detections_AP_H_56_person.json'}"
    assert "note" not in summary["test"] and set(summary["test"]["metrics"]) >= {"AP", "AR"}
    assert [r["boxes"] for r in rows(tmp_path / "work", "eval")] == ["gt"]
    assert rows(tmp_path / "work", "test")[0]["boxes"].startswith("detections:")
    _, meta = load_pose_model(tmp_path / "work" / "final.pt")
    assert meta.extra["boxes"].startswith("detections:")
