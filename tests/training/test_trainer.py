"""Recipe, loss, trainer (exact resume, checkpoints) and the train/evaluate/synth commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditepose.model import load_pose_model
from ditepose.model.quality import recorded_quality
from ditepose.training.config import get_config, list_configs
from ditepose.training.loss import JointsMSELoss
from ditepose.training.synth import synthesize
from ditepose.training.trainer import Trainer
from tests.conftest import REPO_ROOT
from tests.service.jobs.support import free_port
from tests.training.conftest import TINY, synth_set


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_set(tmp_path_factory, "synth_train", 5, 2, 11)


def tiny_config(**kw: object):
    base = dict(input_size=(64, 64), global_batch=3, epochs=2, workers=0, eval_every=0, log_every=1,
                max_people=6, warmup_iters=3, lr=1e-3, model_overrides=TINY)
    base.update(kw)
    return get_config("dite_hrnet_18_coco_256x192").replace(**base)


def test_recipe_lookup_and_validation() -> None:
    cfg = get_config("dite_hrnet_18_coco_256x192")
    assert get_config("dite_hrnet_30_mpii_256x256").num_joints == 16
    assert "dite_hrnet_30_coco_256x192" in list_configs()
    with pytest.raises(KeyError):
        get_config("nope")
    with pytest.raises(KeyError):
        cfg.replace(not_a_field=1)
    with pytest.raises(KeyError, match="global_batch"):
        cfg.replace(batch_size=32)
    with pytest.raises(ValueError, match="divisible by 32"):
        cfg.replace(input_size=(100, 256))
    with pytest.raises(ValueError, match="must divide"):
        cfg.replace(per_device_batch=48)
    with pytest.raises(ValueError, match="amp"):
        cfg.replace(amp="fp8")
    assert cfg.replace(amp=True).amp == "fp16" and cfg.replace(amp=False).amp == "none"  # old .json recipes


def test_joints_mse_loss_matches_mmpose_loop() -> None:
    g = torch.Generator().manual_seed(0)
    out, tgt = torch.rand(2, 3, 4, 5, generator=g), torch.rand(2, 3, 4, 5, generator=g)
    w = torch.tensor([[[1.0], [0.0], [1.0]], [[1.0], [1.0], [0.0]]])
    ref = sum(torch.nn.functional.mse_loss(out[:, j].reshape(2, -1) * w[:, j], tgt[:, j].reshape(2, -1) * w[:, j])
              for j in range(3)) / 3
    assert JointsMSELoss()(out, tgt, w).item() == pytest.approx(ref.item())


def _losses(work: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return [(r["iter"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_resume_reproduces_the_uninterrupted_run(synth_data: Path, tmp_path: Path) -> None:
    full = Trainer(tiny_config(), synth_data, tmp_path / "full", device="cpu", progress=False)
    full.fit()
    part = Trainer(tiny_config(max_iters=3), synth_data, tmp_path / "part", device="cpu", progress=False)
    part.fit()  # stops mid-epoch 2
    assert len(_losses(tmp_path / "part")) == 3
    resumed = Trainer(tiny_config(), synth_data, tmp_path / "part", device="cpu", resume=True, progress=False)
    assert (resumed.epoch, resumed.iter_in_epoch, resumed.global_iter) == (1, 1, 3)
    resumed.fit()
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    assert len(_losses(tmp_path / "full")) == 4
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="recipe differs"):
        Trainer(tiny_config(global_batch=2), synth_data, tmp_path / "part", device="cpu", resume=True, progress=False)
    model, meta = load_pose_model(tmp_path / "full" / "final.pt")
    assert meta.arch == "dite_hrnet_18" and meta.input_size == (64, 64) and meta.extra["recipe"]["epochs"] == 2
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 17, 16, 16)


def _run(*args: str, env_extra: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_cli_synth_train_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ditepose.cli import main

    data, work = tmp_path / "data", tmp_path / "work"
    assert main(["synth", "--format", "coco", "--out", str(data), "--num-images", "3", "--val-images", "2",
                 "--seed", "4"]) == 0
    assert len(json.loads(capsys.readouterr().out)["annotations"]) == 2
    assert main(["train", "dite_hrnet_18", "--data", str(data), "--work-dir", str(work), "--epochs", "1",
                 "--global-batch", "4", "--input", "64x64", "--workers", "0", "--eval-every", "1",
                 "--max-people", "4", "--quiet", "--model-overrides", json.dumps(TINY)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 4 people, padded to a multiple of the authors' 8 processes = 2 global batches of 4
    assert summary["iterations"] == 2 and summary["best"]["metric"] == "AP"
    assert summary["validation"]["boxes"] == "gt" and summary["best"]["boxes"] == "gt"
    assert summary["test"]["boxes"] == "gt" and "not found" in summary["test"]["note"]  # no detections file here
    assert summary["differs_from_authors"]["epochs"] == {"authors": 270, "now": 1, "affects_weights": True}
    assert summary["throughput"][0]["images"] == 8 and summary["throughput"][0]["images_per_s"] > 0
    assert (work / "best.pt").is_file() and (work / "metrics.csv").is_file()
    assert (work / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # curves beside the logs
    # The checkpoint names what its metrics were scored on: the served model's quality (model/quality.py).
    _, meta = load_pose_model(work / "best.pt")
    assert meta.extra["evaluated_on"] == "data val split (4 people)" and "AP" in meta.extra["metrics"]
    assert recorded_quality(str(work / "best.pt"), False, meta.extra).note.endswith("on data val split (4 people), gt boxes.")
    assert main(["evaluate", str(work / "final.pt"), "--data", str(data), "--no-flip",
                 "--plots", str(tmp_path / "eval_plots")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["metrics"]) >= {"AP", "AP50", "AR"} and result["samples"] > 0 and result["boxes"] == "gt"
    assert {Path(p).name for p in result["plots"]} == {"per_joint.png", "oks_hist.png"}
    assert all(Path(p).stat().st_size > 1000 for p in result["plots"])
    assert main(["train", "nope", "--data", str(data), "--work-dir", str(work)]) == 2
    assert "unknown training config" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(synth_data: Path, tmp_path: Path) -> None:
    work = tmp_path / "ddp"
    r = _run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "ditepose",
             "train", "dite_hrnet_18", "--data", str(synth_data), "--work-dir", str(work), "--epochs", "1",
             "--global-batch", "4", "--input", "64x64", "--workers", "0", "--max-iters", "2", "--eval-every", "0",
             "--log-every", "1", "--quiet", "--device", "cpu", "--model-overrides", json.dumps(TINY),
             timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_losses(work)) == 2
    model, meta = load_pose_model(work / "final.pt")
    assert meta.num_joints == 17 and not any(k.startswith("module.") for k in model.state_dict())


def test_mpii_training_evaluates_pckh(tmp_path: Path) -> None:
    synthesize("mpii", tmp_path / "data", 3, seed=2)
    synthesize("mpii", tmp_path / "data", 2, seed=3, split="val")
    cfg = get_config("dite_hrnet_18_mpii_256x256").replace(
        input_size=(64, 64), global_batch=4, epochs=1, workers=0, eval_every=1, max_people=4, model_overrides=TINY,
        ema_decay=0.9, grad_clip=1.0)
    trainer = Trainer(cfg, tmp_path / "data", tmp_path / "work", device="cpu", progress=False)
    summary = trainer.fit()
    assert summary["best"]["metric"] == "PCKh"
    rows = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(evals) == 1 and 0.0 <= evals[0]["PCKh"] <= 100.0 and "Ankle" in evals[0]
    _, meta = load_pose_model(tmp_path / "work" / "best.pt")
    assert meta.dataset == "mpii" and meta.num_joints == 16 and "PCKh" in meta.extra["metrics"]
