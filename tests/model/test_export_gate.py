"""Accuracy-gated exports: an export is scored against PyTorch on a real set and refused when it falls short.

The set is coco-mini's train split with the shipped demo checkpoint (it learned those people:
AP about 0.2 on them), so a broken export fails because its AP drops, not by chance. The broken
export is a real ONNX file whose output heatmap channels are permuted left <-> right (a wrong
keypoint order baked into the graph, what a converter with a bad flip-pair table produces).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ditepose.cli import main
from ditepose.model.keypoints import COCO

GATE_IMAGES = 14  # the first 14 coco-mini train images with people


def bake_channel_permutation(path: Path, order: list[int]) -> None:
    """Rewrite an ONNX heatmap model so its output channels come out in ``order`` (a Gather on axis 1)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    output = model.graph.output[0].name
    raw = f"{output}_before_reorder"
    for node in model.graph.node:
        node.output[:] = [raw if name == output else name for name in node.output]
    model.graph.initializer.append(helper.make_tensor("reorder", TensorProto.INT64, [len(order)], order))
    model.graph.node.append(helper.make_node("Gather", [raw, "reorder"], [output], axis=1))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def gate_args(coco_mini: Path) -> list[str]:
    return ["--gate", str(coco_mini), "--gate-split", "train", "--gate-max-images", str(GATE_IMAGES)]


def _gate_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith('{"gate"')]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])["gate"]


@pytest.fixture(scope="module")
def published(demo_checkpoint: Path, gate_args: list[str], tmp_path_factory: pytest.TempPathFactory,
              ) -> tuple[Path, dict, str]:
    """A gated export of the demo checkpoint: (the published file, its JSON report, stdout)."""
    out = tmp_path_factory.mktemp("gate") / "models" / "demo.onnx"
    report_file = out.parent / "gate.json"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):  # a module-scoped fixture has no capsys
        rc = main(["export", "onnx", str(demo_checkpoint), "--out", str(out), "--dynamic-batch", *gate_args,
                   "--gate-report", str(report_file)])
    stdout = buffer.getvalue()
    assert rc == 0, stdout
    return out, json.loads(report_file.read_text()), stdout


@pytest.mark.slow  # an ONNX export and two evaluations
def test_a_faithful_onnx_export_passes_the_gate_and_is_published(published: tuple[Path, dict, str]) -> None:
    out, report, stdout = published
    assert out.is_file() and not list(out.parent.glob(".*.gating"))
    assert report["passed"] is True and report["metric"] == "AP" and report["margin"] == 0.005
    assert report["pytorch"]["AP"] > 0.1  # a model that scores: the gate has something to lose
    assert abs(report["candidate"]["AP"] - report["pytorch"]["AP"]) <= 0.005
    assert report["max_heatmap_diff"] < 1e-3 and report["samples"] > 20
    assert report["variant"]["backend"] == "onnxruntime" and report["variant"]["path"] == str(out)
    assert _gate_json(stdout) == report
    assert "PyTorch" in stdout and "onnxruntime" in stdout and f"wrote {out}" in stdout


@pytest.mark.slow  # four evaluations
def test_an_export_with_a_wrong_keypoint_order_is_refused_and_not_published(
    published: tuple[Path, dict, str], demo_checkpoint: Path, gate_args: list[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import ditepose.model.export as export_module

    good, passed, _ = published

    # A converter that reorders joints cannot be produced by our exporter: stand it in with a copy of
    # the faithful export whose graph then gets the left/right swap (the exporter's output, broken after).
    def broken_export(module: object, path: str | Path, *args: object, **kwargs: object) -> Path:
        shutil.copyfile(good, path)
        bake_channel_permutation(Path(path), COCO.flip_index())
        return Path(path)

    monkeypatch.setattr(export_module, "export_onnx", broken_export)
    dest = tmp_path / "serving" / "demo.onnx"
    dest.parent.mkdir()
    dest.write_bytes(b"the previously published model")
    rc = main(["export", "onnx", str(demo_checkpoint), "--out", str(dest), "--dynamic-batch", *gate_args])
    captured = capsys.readouterr()
    assert rc == 1
    assert dest.read_bytes() == b"the previously published model"  # untouched, and no staged file left
    assert sorted(p.name for p in dest.parent.iterdir()) == ["demo.onnx"]
    report = _gate_json(captured.out)
    assert report["passed"] is False
    assert report["pytorch"]["AP"] == pytest.approx(passed["pytorch"]["AP"])  # the same reference number
    assert report["drop"] > 0.05  # a real drop, far beyond the margin
    assert report["candidate"]["AP"] < report["pytorch"]["AP"] - 0.005
    assert "refused" in captured.err and f"{dest} was not written" in captured.err
    assert f"{report['pytorch']['AP']:.4f}" in captured.err and f"{report['candidate']['AP']:.4f}" in captured.err
    table = captured.out.splitlines()
    ap_row = next(line for line in table if line.startswith("AP "))
    assert np.allclose([float(v) for v in ap_row.split()[1:3]],
                       [report["pytorch"]["AP"], report["candidate"]["AP"]], atol=1e-4)

    # the same file handed to `export check` (a model converted elsewhere) is refused the same way
    broken = tmp_path / "broken.onnx"
    broken_export(None, broken)
    assert main(["export", "check", str(demo_checkpoint), "--onnx", str(broken), *gate_args]) == 1
    again = capsys.readouterr()
    assert _gate_json(again.out)["candidate"]["AP"] == pytest.approx(report["candidate"]["AP"])
    assert "refused" in again.err


@pytest.mark.slow  # two evaluations
def test_the_serving_engine_is_gated_through_the_same_path(demo_checkpoint: Path, gate_args: list[str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The fp32 engine (BN folding, fast dynamic kernels) against the plain PyTorch network."""
    assert main(["export", "check", str(demo_checkpoint), "--device", "cpu", *gate_args]) == 0
    report = _gate_json(capsys.readouterr().out)
    assert report["passed"] is True and report["variant"]["backend"] == "torch"
    assert report["variant"]["fuse_bn"] is True and report["pytorch"]["AP"] > 0.1


def test_cuda_graphs_are_refused_clearly_on_a_cpu(demo_checkpoint: Path, gate_args: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", "check", str(demo_checkpoint), "--device", "cpu", "--cuda-graphs", *gate_args])
    assert rc == 2 and "cuda_graphs needs a CUDA device" in capsys.readouterr().err


@pytest.mark.slow  # two evaluations
def test_a_reduced_precision_engine_is_gated_through_the_same_path(demo_checkpoint: Path, gate_args: list[str],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """bf16 (autocast; on the CPU here, the same code as on CUDA) is scored and judged like any variant."""
    rc = main(["export", "check", str(demo_checkpoint), "--device", "cpu", "--precision", "bf16", *gate_args])
    report = _gate_json(capsys.readouterr().out)
    assert report["variant"]["precision"] == "bf16" and report["pytorch"]["AP"] > 0.1
    assert rc == (0 if report["passed"] else 1)


def test_gate_input_errors_are_named_before_anything_is_written(
    demo_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DITEPOSE_JOBS_DIR", str(tmp_path / "jobs"))
    out = tmp_path / "m.onnx"
    cases = [
        (["export", "onnx", "dite_hrnet_18", "--out", str(out), "--gate", "demo-synthetic"], "bare arch"),
        (["export", "onnx", str(demo_checkpoint), "--out", str(out), "--gate", "no-such-set"],
         "neither a data folder nor a catalogue dataset: unknown dataset 'no-such-set'"),
        (["export", "onnx", str(demo_checkpoint), "--out", str(out), "--gate", "demo-synthetic", "--gate-margin",
          "-0.1"], "--gate-margin must be >= 0"),
        (["export", "check", str(demo_checkpoint), "--onnx", str(out), "--precision", "fp16", "--gate",
          "demo-synthetic"], "pick one"),
        (["export", "check", str(demo_checkpoint), "--onnx", str(tmp_path / "absent.onnx"), "--device", "cpu",
          "--gate", "demo-synthetic"], "ONNX file not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("ditepose export: error:") and message in err, (argv, err)
        assert not out.exists()


def test_gate_resolves_catalogue_names(demo_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--gate demo-synthetic`` is the jobs' built-in set; a configured MPII set does not fit a COCO model."""
    from ditepose.cli import catalogue_dataset
    from ditepose.model import load_pose_model
    from ditepose.training.gate import resolve_gate_set

    monkeypatch.setenv("DITEPOSE_JOBS_DIR", str(tmp_path / "jobs"))
    _, meta = load_pose_model(demo_checkpoint)
    name, eval_set = resolve_gate_set("demo-synthetic", meta, lookup=catalogue_dataset)
    assert name == "demo-synthetic" and len(eval_set.dataset.records) > 0
    assert eval_set.dataset.input_size_wh == tuple(meta.input_size)
    (tmp_path / "gt.json").write_text("{}")
    monkeypatch.setenv("DITEPOSE_DATASETS", json.dumps({"mpii-val": {
        "format": "mpii", "ann_file": str(tmp_path / "a.json"), "img_dir": str(tmp_path),
        "gt_file": str(tmp_path / "gt.json")}}))
    with pytest.raises(ValueError, match="is a mpii set; the checkpoint predicts coco joints"):
        resolve_gate_set("mpii-val", meta, lookup=catalogue_dataset)


@pytest.mark.slow  # two evaluations
def test_the_openvino_engine_is_gated_with_per_joint_agreement(demo_checkpoint: Path, gate_args: list[str],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``--engine openvino``: the engine the service would serve, scored beside PyTorch; the report carries
    the per-joint keypoint agreement (p50/p99 px) that AP alone cannot give."""
    pytest.importorskip("openvino", reason="openvino is not installed")
    assert main(["export", "check", str(demo_checkpoint), "--device", "cpu", "--engine", "openvino", *gate_args]) == 0
    captured = capsys.readouterr()
    report = _gate_json(captured.out)
    assert report["passed"] is True and report["variant"]["backend"] == "openvino"
    agreement = report["agreement"]
    assert agreement["passed"] is True and len(agreement["joint_p99_px"]) == 17 and agreement["max_px"] < 1.0
    assert "left_shoulder" in captured.out and "p99 px" in captured.out  # the per-joint table beside AP
