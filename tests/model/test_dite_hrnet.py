"""The network is the authors' function: same state-dict layout, same outputs to 1e-8 in float64."""

from __future__ import annotations

import re

import pytest
import torch

from ditepose.model import build_model, get_config, load_checkpoint
from ditepose.model.complexity import count_parameters
from tests.model.support import batch_leak, mirrored_golden_batch

CASES = {
    "dite_hrnet_18": ("dite_hrnet_18_coco_random.pth", "dite_hrnet_18_coco_golden_io.pt", 17, 1_186_933),
    "dite_hrnet_30": ("dite_hrnet_30_mpii_random.pth", "dite_hrnet_30_mpii_golden_io.pt", 16, 1_862_508),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def reference(request, reference_dir):
    arch = request.param
    ckpt, io_file, joints, params = CASES[arch]
    model = build_model(arch, num_joints=joints)
    load_checkpoint(model, reference_dir / ckpt)
    golden = torch.load(reference_dir / io_file, weights_only=True)
    return arch, model, golden, params


def test_parameter_count_matches_the_paper_configs(reference):
    _, model, golden, params = reference
    assert count_parameters(model) == params == golden["params"]


def test_float64_eval_output_matches_reference(reference):
    _, model, golden, _ = reference
    model = model.double().eval()
    with torch.no_grad():
        out = model(golden["input"].double())
    model.float()
    assert out.shape == golden["heatmaps_eval_fp64"].shape
    assert (out - golden["heatmaps_eval_fp64"]).abs().max().item() < 1e-8


def test_float64_train_mode_output_matches_reference(reference):
    _, model, golden, _ = reference
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model = model.double().train()
    with torch.no_grad():
        out = model(golden["input"].double())
    model.float().eval()
    model.load_state_dict(state)  # undo the running-statistics update
    assert (out - golden["heatmaps_train_mode_fp64"]).abs().max().item() < 1e-8


def test_float32_eval_output_within_tolerance(reference):
    _, model, golden, _ = reference
    with torch.no_grad():
        out = model.eval()(golden["input"])
    assert (out.double() - golden["heatmaps_eval_fp64"]).abs().max().item() < 2e-3


@pytest.mark.parametrize(("height", "width"), [(256, 192), (384, 288), (256, 256)])
def test_supported_input_sizes(height, width):
    model = build_model("dite_hrnet_18").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, height, width))
    assert out.shape == (1, 17, height // 4, width // 4)


@pytest.mark.parametrize(("height", "width"), [(250, 190), (256, 200), (100, 96)])
def test_unsupported_input_size_gives_clear_error(height, width):
    model = build_model("dite_hrnet_18").eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, height, width))


def test_batch_gives_the_same_output_as_each_image_alone(reference_dir):
    """The dynamic kernels are per sample: no sample may leak into another's output."""
    model = build_model("dite_hrnet_18")
    load_checkpoint(model, reference_dir / CASES["dite_hrnet_18"][0])
    model = model.double().eval()
    assert batch_leak(model, mirrored_golden_batch(reference_dir)) < 1e-10


def test_gradients_reach_every_parameter():
    model = build_model("dite_hrnet_18").train()
    model(torch.randn(2, 3, 128, 96)).pow(2).mean().backward()
    no_grad = {name for name, p in model.named_parameters() if p.grad is None}
    # a softmax is shift invariant, so the bias of an attention mask gets a zero gradient by design
    zero = {
        name for name, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() == 0 and not re.search(r"conv_mask(\.\d+)?\.bias$", name)
    }
    assert zero == set()
    # The reference pools every branch but the lowest, so each dense-context mask of the lowest
    # branch is a dead parameter there too (kept: the checkpoints carry it).
    config = model.config
    dead = {
        f"backbone.stage{s}.{m}.layers.{b}.dcm.conv_mask.{config.num_branches[s] - 1}.{p}"
        for s in range(3)
        for m in range(config.num_modules[s])
        for b in range(config.num_blocks[s])
        for p in ("weight", "bias")
    }
    assert no_grad == dead
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_overrides_and_ablation_switches():
    config = get_config("dite_hrnet_18", dsc_groups=[2, 2, 2, 2], dsc_kernels=(2, 2, 2, 2))
    assert config.dsc_groups == (2, 2, 2, 2)
    full = count_parameters(build_model("dite_hrnet_18"))
    for switch in ("use_dsc", "use_dcm", "use_gcm"):
        model = build_model("dite_hrnet_18", **{switch: False}).eval()
        assert count_parameters(model) < full
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64)).shape == (1, 17, 16, 16)
    with pytest.raises(TypeError, match="unknown override"):
        build_model("dite_hrnet_18", dsc_group=(1, 1, 2, 4))
    with pytest.raises(KeyError, match="dite_hrnet_18"):
        build_model("dite_hrnet_99")
