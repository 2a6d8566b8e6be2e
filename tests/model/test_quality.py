"""A served model says how good it is: the checkpoint's recorded evaluation, or why there is none."""

from __future__ import annotations

import pytest

from ditepose.model.checkpoint import load_pose_model
from ditepose.model.defaults import default_checkpoint_path
from ditepose.model.quality import (
    NOT_EVALUATED_NOTE,
    RANDOM_NOTE,
    is_shipped_demo,
    recorded_quality,
)


def test_the_shipped_demo_checkpoint_is_named_for_what_it_is():
    path = default_checkpoint_path()
    assert path is not None, "the demo checkpoint ships with the project (model/weights)"
    _, meta = load_pose_model(path)
    quality = recorded_quality(str(path), random_weights=False, extra=meta.extra)
    assert quality.evaluated and quality.demo_checkpoint
    assert quality.metric == "AP"
    assert quality.value == pytest.approx(0.0023, abs=5e-5)  # pinned in tests/model/test_demo_checkpoint.py
    assert quality.dataset is not None and "coco-mini val" in quality.dataset
    assert quality.boxes == "gt"
    assert "DEMO" in quality.note and "NOT usable" in quality.note and "0.0023" in quality.note


def test_random_weights_are_not_evaluated():
    quality = recorded_quality(None, random_weights=True, extra={})
    assert not quality.evaluated and quality.note == RANDOM_NOTE and quality.value is None


def test_a_checkpoint_without_a_recorded_evaluation_says_so(tmp_path):
    quality = recorded_quality(str(tmp_path / "mine.pth"), random_weights=False, extra={"epoch": 3, "metrics": {}})
    assert not quality.evaluated and quality.note == NOT_EVALUATED_NOTE and not quality.demo_checkpoint


def test_a_recorded_evaluation_names_its_data_and_boxes(tmp_path):
    extra = {"metrics": {"AP": 0.6591, "AR": 0.72, "note": "text is dropped"}, "boxes": "nanodet",
             "evaluated_on": "coco val2017 (5000 images)"}
    quality = recorded_quality(str(tmp_path / "trained.pth"), random_weights=False, extra=extra)
    assert quality.evaluated and (quality.metric, quality.value) == ("AP", 0.6591)
    assert quality.metrics == {"AP": 0.6591, "AR": 0.72}
    assert quality.note == "Recorded evaluation: AP 0.6591 on coco val2017 (5000 images), nanodet boxes."


def test_mpii_checkpoints_report_pckh(tmp_path):
    quality = recorded_quality(str(tmp_path / "m.pth"), random_weights=False, extra={"metrics": {"PCKh": 88.1}})
    assert (quality.metric, quality.value) == ("PCKh", 88.1)
    assert "not named in the checkpoint" in quality.note


def test_only_the_shipped_file_counts_as_the_demo(tmp_path):
    path = default_checkpoint_path()
    assert is_shipped_demo(str(path))
    assert not is_shipped_demo(str(tmp_path / path.name))  # same name elsewhere: a user's file
    assert not is_shipped_demo(None)
