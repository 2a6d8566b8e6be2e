"""Checkpoint I/O: strict loading with clear errors, and our metadata round trip."""

from __future__ import annotations

import subprocess

import pytest
import torch

from ditepose.model import CheckpointMeta, build_model, load_checkpoint, load_pose_model, save_checkpoint
from ditepose.model.checkpoint import CheckpointError
from tests.conftest import REPO_ROOT, python_cmd, subprocess_env


def test_authors_checkpoint_loads_with_inferred_architecture(reference_dir):
    module, meta = load_pose_model(reference_dir / "dite_hrnet_30_mpii_random.pth")
    assert (meta.arch, meta.dataset, meta.num_joints, meta.input_size) == ("dite_hrnet_30", "mpii", 16, (256, 256))
    assert not module.training
    module, meta = load_pose_model(reference_dir / "dite_hrnet_18_coco_random.pth")
    assert (meta.arch, meta.dataset, meta.num_joints, meta.input_size) == ("dite_hrnet_18", "coco", 17, (192, 256))


def test_wrong_architecture_is_refused_naming_the_keys(reference_dir):
    model = build_model("dite_hrnet_18", num_joints=17)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, reference_dir / "dite_hrnet_30_mpii_random.pth")
    message = str(err.value)
    assert "unexpected key(s)" in message and "backbone.stage0.2." in message
    assert "shape mismatch" in message and "keypoint_head.final_layer.weight" in message


def test_missing_keys_are_named(tmp_path):
    model = build_model("dite_hrnet_18")
    state = model.state_dict()
    del state["keypoint_head.final_layer.bias"]
    torch.save({"state_dict": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): keypoint_head\.final_layer\.bias"):
        load_checkpoint(build_model("dite_hrnet_18"), tmp_path / "partial.pth")


def test_corrupt_and_absent_files(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_pose_model(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_pose_model(tmp_path / "nope.pth")


def test_save_and_load_round_trip_with_metadata(tmp_path):
    model = build_model("dite_hrnet_18", num_joints=16, dsc_groups=(1, 2, 2, 4)).eval()
    meta = CheckpointMeta("dite_hrnet_18", "mpii", 16, (256, 256), overrides={"dsc_groups": (1, 2, 2, 4)},
                          extra={"metrics": {"PCKh": 0.5}})
    path = save_checkpoint(tmp_path / "ours.pth", model, meta)
    loaded, loaded_meta = load_pose_model(path)
    assert loaded_meta.to_dict() == meta.to_dict()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # our files keep the mmpose layout, so mmpose-style loading works too
    raw = torch.load(path, weights_only=True)
    assert "keypoint_head.final_layer.weight" in raw["state_dict"]


def test_model_info_command_prints_params_and_macs():
    result = subprocess.run(
        python_cmd("model-info", "dite_hrnet_18", "--input", "256x192"),
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120, check=True,
    )
    assert "1.187 M params" in result.stdout
    assert "M MACs at 256x192" in result.stdout
