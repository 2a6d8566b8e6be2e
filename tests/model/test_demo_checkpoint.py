"""The shipped demo checkpoint: what it was trained with and what it measures (see model/weights/README.md).

It is the registered COCO recipe for Dite-HRNet-18 trained on coco-mini train (86 people) with only
the schedule and the batch scaled down; it learned the people it saw and does not generalise to the
held-out coco-mini val. Both facts are pinned here so the README's numbers cannot silently go stale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ditepose.model import default_checkpoint_path, load_pose_model
from ditepose.training.config import get_config


def test_demo_checkpoint_is_shipped_with_its_recipe_and_differences():
    path = default_checkpoint_path()
    assert path is not None, "model/weights/dite_hrnet_18_coco_demo.pth is missing"
    assert path.stat().st_size < 8 * 2**20  # committed: weights and metadata only, no optimizer state
    _, meta = load_pose_model(path)
    assert (meta.arch, meta.dataset, meta.num_joints, meta.input_size) == ("dite_hrnet_18", "coco", 17, (192, 256))
    assert meta.extra["reproduces"] == get_config("dite_hrnet_18_coco_256x192").reproduces
    # Only the schedule and the batch were scaled down; everything else that shapes the weights is
    # the authors' (lr 2e-3, Adam, augmentation, sigma, fp32, seed ...).
    diffs = meta.extra["differs_from_authors"]
    assert {k for k, d in diffs.items() if d["affects_weights"]} == {"epochs", "global_batch", "lr_steps",
                                                                       "warmup_iters"}
    assert (diffs["epochs"]["now"], diffs["lr_steps"]["now"], diffs["global_batch"]["now"]) == (90, [57, 67], 16)
    recipe = meta.extra["recipe"]
    assert (recipe["lr"], recipe["amp"], recipe["scale_lr"]) == (0.002, "none", False)
    assert (meta.extra["epoch"], meta.extra["iterations"]) == (90, 450)


def _evaluate(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    from ditepose.cli import main

    assert main(["evaluate", str(default_checkpoint_path()), *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["boxes"] == "gt"
    return out


def test_demo_checkpoint_learned_the_people_it_was_trained_on(coco_mini: Path, capsys):
    out = _evaluate(capsys, "--data", str(coco_mini), "--split", "train")
    assert out["samples"] == 86
    # measured 0.217 AP / 0.562 AP50 on its 86 training people (GT boxes, flip test); random weights give 0
    assert out["metrics"]["AP"] == pytest.approx(0.217, abs=0.03)
    assert out["metrics"]["AP50"] > 0.45


def test_demo_checkpoint_is_poor_on_held_out_real_photos(coco_mini: Path, capsys):
    """coco-mini val (79 images, 68 people, GT boxes): the number the README reports, pinned."""
    out = _evaluate(capsys, "--data", str(coco_mini))
    assert out["samples"] == 68
    # measured 0.0023 AP / 0.023 AP50: 86 training people do not make a pose estimator
    assert out["metrics"]["AP"] == pytest.approx(0.0023, abs=0.003)
    assert out["metrics"]["AP50"] == pytest.approx(0.0227, abs=0.01)
