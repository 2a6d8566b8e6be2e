"""build_engine: one table picks the backend; what a backend or a device cannot do is refused up front."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import torch

from ditepose.model import build_model
from ditepose.model.engines import BACKENDS, Backend, build_engine
from ditepose.model.engines.onnxruntime_engine import OnnxEngine
from ditepose.model.engines.torch_engine import InferenceEngine


def test_the_table_names_every_backend() -> None:
    assert set(BACKENDS) == set(get_args(Backend)) == {"torch", "onnxruntime", "openvino"}


def test_torch_is_the_default_backend_and_auto_is_fp32_on_a_cpu() -> None:
    model = build_model("dite_hrnet_18")
    engine = build_engine(model, "cpu", "auto")
    assert isinstance(engine, InferenceEngine)
    info = engine.describe()
    assert info["backend"] == "torch" and info["precision"] == "fp32" and info["fuse_bn"] is True
    plain = build_engine(model, fuse_bn=False, channels_last=False, batch_buckets=(2,))
    assert plain.describe()["fuse_bn"] is False and plain.describe()["batch_buckets"] == [2]
    x = torch.randn(3, 3, 64, 64)
    assert (plain(x) - engine(x)).abs().max().item() < 5e-4


def test_what_cannot_run_is_refused_before_anything_runs(tmp_path: Path) -> None:
    model = build_model("dite_hrnet_18")
    cases = [
        (lambda: build_engine(model, backend="tensorrt"), "backend must be one of"),  # type: ignore[arg-type]
        (lambda: build_engine(model, "cpu", "int8"), "precision must be one of"),
        (lambda: build_engine(model, "cpu", cuda_graphs=True), "cuda_graphs needs a CUDA device"),
        (lambda: build_engine(model, "cuda:0", process=True), "child-process engine runs on the CPU"),
        (lambda: build_engine(tmp_path / "m.onnx"), "the torch backend runs a network"),
        (lambda: build_engine(model, backend="onnxruntime"), "export the network first"),
        (lambda: build_engine(tmp_path / "m.onnx", "cuda", backend="onnxruntime"), "CPU provider"),
        (lambda: build_engine(tmp_path / "m.onnx", "cpu", "bf16", backend="onnxruntime", compile=True),
         "not applicable: precision bf16, compile"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()
    with pytest.raises(FileNotFoundError, match="ONNX file not found"):
        build_engine(tmp_path / "m.onnx", backend="onnxruntime")


def _fixed_batch_onnx(path: Path, batch: int) -> Path:
    """An ONNX 'network' of one fixed batch size: heatmaps = 2 * images (enough to see rows move)."""
    import onnx
    from onnx import TensorProto, helper

    shape = [batch, 3, 8, 8]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["images", "two"], ["heatmaps"])], "fixed",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, shape)],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_a_fixed_batch_onnx_file_answers_any_batch(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    engine = build_engine(_fixed_batch_onnx(tmp_path / "fixed.onnx", 2), backend="onnxruntime")
    assert isinstance(engine, OnnxEngine)
    assert engine.describe()["dynamic_batch"] is False and engine.describe()["batch_buckets"] == [2]
    for rows in (1, 2, 5):
        x = torch.randn(rows, 3, 8, 8)
        assert torch.equal(engine(x), 2 * x)
