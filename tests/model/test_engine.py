"""The optimised network and InferenceEngine compute the reference function (fixtures from the authors' code)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from ditepose.model import build_model, load_checkpoint
from ditepose.model.engines.torch_engine import InferenceEngine
from ditepose.model.fast_blocks import FastPoseNet
from ditepose.model.optimize import optimize_for_inference
from tests.model.support import REFERENCE_CASES as CASES
from tests.model.support import assert_refuses, batch_leak, load_reference, mirrored_golden_batch

FP32_TOL = 2e-3


@pytest.fixture(scope="module", params=sorted(CASES))
def reference(request, reference_dir):
    return load_reference(reference_dir, request.param)


# every path on -18; the default path and the export path on -30 (keeps the suite short)
PATHS = [("grouped", False), ("fast", False), ("fast", True), ("stacked", False)]


@pytest.mark.parametrize(("dynamic", "channels_last"), PATHS)
def test_optimised_fp32_within_tolerance_of_fp64_reference(reference, dynamic, channels_last):
    model, golden = reference
    if model.config.name == "dite_hrnet_30" and (dynamic, channels_last) not in (("fast", True), ("stacked", False)):
        pytest.skip("covered on dite_hrnet_18")
    fast = optimize_for_inference(model, dynamic=dynamic)
    fast.channels_last = channels_last
    with torch.inference_mode():
        out = fast(golden["input"])
    assert out.shape == golden["heatmaps_eval_fp64"].shape
    assert (out.double() - golden["heatmaps_eval_fp64"]).abs().max().item() < FP32_TOL


@pytest.mark.parametrize("dynamic", ["grouped", "fast", "stacked"])
def test_optimised_fp64_is_the_same_function(reference, dynamic):
    model, golden = reference
    if model.config.name == "dite_hrnet_30" and dynamic != "fast":
        pytest.skip("covered on dite_hrnet_18")
    fast = optimize_for_inference(model.double(), dynamic=dynamic)
    model.float()
    assert next(fast.buffers()).dtype == torch.float64
    with torch.inference_mode():
        out = fast(golden["input"].double())
    assert (out - golden["heatmaps_eval_fp64"]).abs().max().item() < 1e-10


@pytest.mark.parametrize(("dynamic", "channels_last"), [("fast", False), ("fast", True), ("stacked", False)])
def test_per_sample_dynamic_kernels_do_not_leak_across_the_batch(reference_dir, dynamic, channels_last):
    model = build_model("dite_hrnet_18")
    load_checkpoint(model, reference_dir / CASES["dite_hrnet_18"][0])
    fast = optimize_for_inference(model.double(), dynamic=dynamic)
    fast.channels_last = channels_last  # batch 3: per-sample convs on big maps, batch-folded on small ones
    assert batch_leak(fast, mirrored_golden_batch(reference_dir)) < 1e-10


def test_channels_last_network_stays_channels_last_between_blocks(reference):
    """A channel slice handed to oneDNN as is comes back NCHW: the whole network would silently
    leave channels-last, where its depth-wise convs run several times slower."""
    model, golden = reference
    fast = optimize_for_inference(model)
    fast.channels_last = True
    layouts: list[tuple[str, bool]] = []

    def record(module, inputs, output):
        for y in output if isinstance(output, list) else [output]:
            layouts.append((type(module).__name__, y.is_contiguous(memory_format=torch.channels_last)))

    from ditepose.model.fast_blocks import FastBlock, FastCrossResolution, FastStem

    hooks = [m.register_forward_hook(record) for m in fast.modules() if isinstance(m, FastStem | FastBlock | FastCrossResolution)]
    with torch.inference_mode():
        for batch in (1, 2):
            fast(golden["input"][:batch])
    for hook in hooks:
        hook.remove()
    assert len(layouts) > 20 and all(cl for _, cl in layouts), [name for name, cl in layouts if not cl]


def test_optimised_network_runs_under_mixed_precision_autocast(reference):
    """The CUDA engine's fp16 autocast path, exercised with CPU autocast: mixed dtypes must not
    break the in-place writes, and the error must stay within the eager graph's own."""
    model, golden = reference
    if model.config.name == "dite_hrnet_30":
        pytest.skip("the random-weight -30 reference overflows fp16 in the authors' graph too (NaN)")
    fast = optimize_for_inference(model)
    fast.channels_last = True
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
        ours = fast(golden["input"])
        eager = model(golden["input"])
    assert ours.dtype == torch.float16 and ours.shape == golden["heatmaps_eval_fp64"].shape
    ours_err = (ours.double() - golden["heatmaps_eval_fp64"]).abs().max().item()
    eager_err = (eager.double() - golden["heatmaps_eval_fp64"]).abs().max().item()
    assert ours_err < max(2 * eager_err, 0.05), (ours_err, eager_err)


def test_conversion_leaves_the_reference_model_untouched(reference):
    model, _ = reference
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model)
    assert model.training
    model.eval()
    assert isinstance(fast, FastPoseNet) and not fast.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in fast.parameters())
    # no storage shared: changing the optimised copy cannot change the trained model
    ours = {t.data_ptr() for t in model.state_dict().values()}
    assert not ours & {t.data_ptr() for t in fast.state_dict().values()}


def test_optimise_rejects_other_modules_and_bad_modes():
    with pytest.raises(TypeError, match="TopDownPoseNet"):
        optimize_for_inference(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="dynamic"):
        optimize_for_inference(build_model("dite_hrnet_18"), dynamic="magic")


@pytest.mark.parametrize("fuse_bn", [True, False])
def test_engine_call_matches_reference_and_returns_cpu_float32(reference, fuse_bn):
    model, golden = reference
    engine = InferenceEngine(model, device="cpu", fuse_bn=fuse_bn)
    out = engine(golden["input"])
    assert out.device.type == "cpu" and out.dtype == torch.float32 and not out.is_inference()
    assert (out.double() - golden["heatmaps_eval_fp64"]).abs().max().item() < FP32_TOL
    out.mul_(0)  # callers may modify the result in place


def test_engine_owns_a_copy_and_describes_itself(reference_dir):
    model = build_model("dite_hrnet_18")
    load_checkpoint(model, reference_dir / CASES["dite_hrnet_18"][0])
    model.train()
    engine = InferenceEngine(model, channels_last=False)
    assert model.training  # not switched to eval behind the caller's back
    info = engine.describe()
    assert info == {**info, "device": "cpu", "precision": "fp32", "fuse_bn": True, "dynamic_kernels": "fast",
                    "channels_last": False, "compile": False, "cuda_graphs": False, "optimized_module": True}
    ran = _record_runs(engine)
    seconds = engine.warmup([1, 2], input_hw=(64, 64))
    assert [shape for shape, _ in ran] == [(1, 3, 64, 64), (2, 3, 64, 64)]  # each size once, at that input
    assert math.isfinite(seconds) and seconds >= sum(spent for _, spent in ran) > 0  # it times those runs
    with torch.no_grad():
        model.backbone.stem.conv1.conv.weight.zero_()
    x = torch.randn(2, 3, 64, 64)
    assert engine(x).abs().sum() > 0  # the engine's copy is unaffected


def _record_runs(engine: InferenceEngine) -> list[tuple[tuple[int, ...], float]]:
    """(input shape, seconds) of every forward pass ``engine`` runs from now on."""
    ran: list[tuple[tuple[int, ...], float]] = []
    forward = engine._run

    def timed(x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = forward(x)
        ran.append((tuple(x.shape), time.perf_counter() - start))
        return out

    engine._run = timed
    return ran


def test_warmup_defaults_to_every_bucket_else_batch_one():
    model = build_model("dite_hrnet_18")
    bucketed, plain = InferenceEngine(model, batch_buckets=(4, 1, 2)), InferenceEngine(model)
    bucketed_runs, plain_runs = _record_runs(bucketed), _record_runs(plain)
    bucketed.warmup(input_hw=(64, 64))
    plain.warmup(input_hw=(64, 64))
    assert [shape[0] for shape, _ in bucketed_runs] == [1, 2, 4]
    assert [shape for shape, _ in plain_runs] == [(1, 3, 64, 64)]


def test_batch_buckets_pad_and_split_without_mixing_samples(reference):
    """A compiled (or CUDA-graphed) engine pads to fixed batch sizes; results must not change."""
    model, golden = reference
    plain = InferenceEngine(model)
    bucketed = InferenceEngine(model, batch_buckets=(2, 4))
    assert bucketed.describe()["batch_buckets"] == [2, 4] and plain.describe()["batch_buckets"] == []
    crops = golden["input"][torch.tensor([0, 1, 1, 0, 1])]
    for n in (1, 3, 5):  # pad 1 -> 2, pad 3 -> 4, split 5 -> 4 + (1 -> 2)
        assert (bucketed(crops[:n]) - plain(crops[:n])).abs().max().item() < 5e-4  # fp32 rounding only
    with pytest.raises(ValueError, match="batch_buckets"):
        InferenceEngine(model, batch_buckets=(0, 4))


def test_engine_rejects_bad_arguments_and_inputs():
    model = build_model("dite_hrnet_18")
    assert InferenceEngine(model, precision="bf16").precision == "bf16"  # CPU autocast (tests/model/test_engine_cuda.py)
    with pytest.raises(ValueError, match="precision"):
        InferenceEngine(model, precision="int3")
    with pytest.raises(ValueError, match="device"):
        InferenceEngine(model, device="tpu")
    with pytest.raises(ValueError, match="cuda_graphs"):
        InferenceEngine(model, cuda_graphs=True)
    assert_refuses(InferenceEngine(model), [
        (torch.randn(3, 64, 64), ValueError, "NCHW"),
        (torch.randn(1, 4, 64, 64), ValueError, "3 channels"),
        (torch.randn(1, 3, 70, 64), ValueError, "multiples of 32"),
        (torch.randn(0, 3, 64, 64), ValueError, "empty"),
        ([[1.0]], TypeError, None),
    ])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# fp16/bf16 bounds: those tests/model/test_engine_cuda.py measured under CPU autocast on these
# inputs (0.34 and 2.7 max; the reference's heatmaps are sensitive by design), with its margin
@pytest.mark.parametrize(("precision", "graphs", "tol"), [("fp32", False, 2e-3), ("fp32", True, 2e-3),
                                                         ("fp16", False, 0.75), ("bf16", True, 4.0)])
def test_engine_on_cuda(reference, precision, graphs, tol):
    model, golden = reference
    engine = InferenceEngine(model, device="cuda", precision=precision, cuda_graphs=graphs)
    engine.warmup([2], input_hw=tuple(golden["input"].shape[-2:]))
    for _ in range(2):  # graph replay gives the same result twice
        out = engine(golden["input"])
        assert out.device.type == "cpu" and out.dtype == torch.float32
        assert (out.double() - golden["heatmaps_eval_fp64"]).abs().max().item() < tol


@pytest.mark.parametrize("overrides", [{"use_dsc": False}, {"use_dcm": False}, {"use_gcm": False},
                                       {"dsc_groups": (2, 2, 2, 2), "dsc_kernels": (2, 2, 2, 2)}])
def test_optimised_ablation_variants_match_their_reference(overrides):
    torch.manual_seed(0)
    model = build_model("dite_hrnet_18", **overrides).double().eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so folding is really tested
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.inference_mode():
        expected = model(x)
        for dynamic in ("fast", "stacked"):
            out = optimize_for_inference(model, dynamic=dynamic)(x)
            assert (out - expected).abs().max().item() < 1e-10 * max(1.0, expected.abs().max().item())


def test_engine_runs_other_modules_unoptimised():
    module = torch.nn.Conv2d(3, 17, 1)
    engine = InferenceEngine(module)
    assert engine.describe()["fuse_bn"] is False
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(engine(x), module(x))
