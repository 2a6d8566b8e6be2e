"""``ditepose train --lr-steps``: a shortened schedule moves the lr drops, and the run records it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ditepose.cli import build_parser, main
from tests.training.conftest import TINY, synth_set


@pytest.mark.parametrize("text", ["57,x", "67,57", "-1"])
def test_bad_lr_steps_are_a_usage_error(text: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["train", "dite_hrnet_18_coco_256x192", "--data", "d", "--work-dir", "w",
                                   "--lr-steps", text])
    assert exc.value.code == 2 and "lr steps" in capsys.readouterr().err


@pytest.mark.slow
def test_lr_steps_move_the_drop_and_are_recorded(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                                 capsys) -> None:
    data = synth_set(tmp_path_factory, "synth_lr_steps", 4, 1, 5)
    work = tmp_path / "w"
    assert main(["train", "dite_hrnet_18_coco_256x192", "--data", str(data), "--work-dir", str(work),
                 "--input", "64x64", "--epochs", "3", "--lr-steps", "1,2", "--global-batch", "4",
                 "--warmup-iters", "1", "--workers", "0", "--eval-every", "0", "--checkpoint-every", "0",
                 "--log-every", "1", "--model-overrides", json.dumps(TINY), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["differs_from_authors"]["lr_steps"] == {"authors": [170, 200], "now": [1, 2],
                                                           "affects_weights": True}
    assert json.loads((work / "recipe.json").read_text())["config"]["lr_steps"] == [1, 2]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    lr_by_epoch = {r["epoch"]: r["lr"] for r in rows if r["kind"] == "train" and r["iter"] > 1}
    assert lr_by_epoch[1] == pytest.approx(2e-3)
    assert lr_by_epoch[2] == pytest.approx(2e-4) and lr_by_epoch[3] == pytest.approx(2e-5)
