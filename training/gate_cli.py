"""The ``export`` commands: ``export onnx`` (optionally gated) and ``export check`` (the gate alone).

Every export format can be put through the accuracy gate (:mod:`ditepose.training.gate`), which
runs the evaluation loop, so the commands are registered from here rather than by the model
package (which knows no training). Dataset names given to ``--gate`` are resolved by the
``find_dataset`` the root CLI hands to :func:`register` (the service's evaluation catalogue).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ditepose.model.arguments import parse_size, whole_number
from ditepose.model.engines.precision import PRECISIONS
from ditepose.model.engines.setting import ENGINE_SETTINGS

if TYPE_CHECKING:
    from ditepose.model.checkpoint import CheckpointMeta
    from ditepose.model.dite_hrnet import TopDownPoseNet
    from ditepose.model.engines import Engine
    from ditepose.training.boxes import EvalSet
    from ditepose.training.gate import DatasetLookup, GateReport

def _load_source(source: str, joints: int, gated: bool) -> tuple[TopDownPoseNet, CheckpointMeta | None,
                                                                   tuple[int, int]]:
    """A checkpoint file or a bare arch (random weights): (network, its metadata, input (W, H))."""
    from ditepose.model.checkpoint import load_pose_model
    from ditepose.model.registry import build_model, list_models

    if source in list_models():
        if gated:
            raise ValueError(f"--gate needs a checkpoint file: {source!r} is a bare arch (random weights, "
                             "no dataset to score it on)")
        return build_model(source, num_joints=joints).eval(), None, (192, 256)
    if not Path(source).exists():
        raise FileNotFoundError(f"{source!r} is neither a checkpoint file nor an arch ({list_models()})")
    module, meta = load_pose_model(source)
    return module, meta, meta.input_size


def _gate_set(args: argparse.Namespace, meta: CheckpointMeta,
              find_dataset: DatasetLookup | None) -> tuple[str, EvalSet]:
    """(name, set) of ``--gate``, resolved before any slow work."""
    from ditepose.training.gate import resolve_gate_set

    if args.gate_margin is not None and not args.gate_margin >= 0:
        raise ValueError(f"--gate-margin must be >= 0, got {args.gate_margin}")
    return resolve_gate_set(args.gate, meta, args.gate_split, args.gate_max_images, lookup=find_dataset)


def _report_gate(report: GateReport, report_file: str | None) -> None:
    print(report.table())
    data = report.to_dict()
    print(json.dumps({"gate": data}))
    if report_file:
        Path(report_file).parent.mkdir(parents=True, exist_ok=True)
        Path(report_file).write_text(json.dumps(data, indent=2) + "\n")


def _variant(engine: Engine) -> dict[str, Any]:
    """The engine's description and the label the gate's table prints for it."""
    info = engine.describe()
    if info["backend"] == "onnxruntime":
        return {**info, "label": "onnxruntime"}
    if info["backend"] == "openvino":
        return {**info, "label": f"openvino {info['precision']}"}
    switches = [info["precision"]] + [name for name, on in (("compiled", info["compile"]),
                                                             ("cuda-graphs", info["cuda_graphs"])) if on]
    return {**info, "label": f"engine {'+'.join(switches)} on {info['device']}"}


def _export_onnx(args: argparse.Namespace, find_dataset: DatasetLookup | None) -> int:
    module, meta, default_wh = _load_source(args.source, args.joints, bool(args.gate))
    gate_set = _gate_set(args, meta, find_dataset) if args.gate and meta is not None else None
    width, height = args.input or default_wh
    if meta is not None and gate_set is not None and (width, height) != tuple(meta.input_size):
        raise ValueError(f"--gate scores the checkpoint at its own input size {meta.input_size[1]}x"
                         f"{meta.input_size[0]}; drop --input {height}x{width} or --gate")
    dest = Path(args.out)
    # a gated export is written beside its destination and renamed over it only when it passes
    # (one atomic os.replace: a reader never sees a half-written or refused file)
    target = dest.with_name(f".{dest.name}.gating") if gate_set is not None else dest
    try:
        path, shape = _write_onnx(args, module, target, (height, width))
        print(f"exported {shape}; gating it before it is written to {dest}" if gate_set is not None
              else f"wrote {path} ({shape})")
        if args.check:
            _compare_with_torch(module, path, [1, 3] if args.dynamic_batch else [args.batch], (height, width))
        if gate_set is None:
            return 0
        if not _gate_export(args, module, path, dest, gate_set):
            return 1
        os.replace(path, dest)
        print(f"wrote {dest} ({shape}; gate passed)")
        return 0
    finally:
        if target != dest:
            target.unlink(missing_ok=True)


def _write_onnx(args: argparse.Namespace, module: TopDownPoseNet, target: Path,
                input_hw: tuple[int, int]) -> tuple[Path, str]:
    """The export itself: (the file, a description of its shape)."""
    from ditepose.model.export import export_onnx

    height, width = input_hw
    path = export_onnx(module, target, input_hw, dynamic_batch=args.dynamic_batch, optimized=not args.plain,
                       batch=args.batch)
    shape = (f"input {height}x{width}, batch {'dynamic' if args.dynamic_batch else args.batch}, "
             f"{'plain' if args.plain else 'optimised'} graph")
    return path, shape


def _compare_with_torch(module: TopDownPoseNet, path: Path, sizes: list[int], input_hw: tuple[int, int]) -> None:
    """``--check``: onnxruntime against PyTorch on random batches of ``sizes``."""
    import torch

    from ditepose.model.export import max_abs_diff_vs_torch

    for size in sizes:
        diff = max_abs_diff_vs_torch(module, path, torch.randn(size, 3, *input_hw))
        print(f"check: batch {size}: max |onnxruntime - torch| = {diff:.2e}")


def _gate_export(args: argparse.Namespace, module: TopDownPoseNet, path: Path, dest: Path,
                 gate_set: tuple[str, EvalSet]) -> bool:
    """Score the exported file against ``module``; prints the report, says whether it passed."""
    from ditepose.model.engines import build_engine
    from ditepose.model.pipeline import module_infer
    from ditepose.training.gate import gate

    name, eval_set = gate_set
    engine = build_engine(path, "cpu", "fp32", backend="onnxruntime")
    report = gate(module_infer(module), engine, eval_set, name, candidate_label="onnxruntime",
                  variant={**_variant(engine), "path": str(dest)}, margin=args.gate_margin,
                  flip=not args.gate_no_flip, batch_size=args.gate_batch)
    _report_gate(report, args.gate_report)
    if not report.passed:
        print(f"ditepose export: {report.verdict()}; {dest} was not written", file=sys.stderr)
    return report.passed


def _export_check(args: argparse.Namespace, find_dataset: DatasetLookup | None) -> int:
    import torch

    from ditepose.model.engines import build_engine
    from ditepose.model.pipeline import module_infer
    from ditepose.training.gate import gate

    engine_flags = args.precision != "fp32" or args.compile or args.cuda_graphs or args.no_fuse_bn
    if args.engine != "torch" and (args.onnx or args.compile or args.cuda_graphs or args.no_fuse_bn):
        raise ValueError(f"--engine {args.engine} picks the served engine; --onnx/--compile/--cuda-graphs/"
                         "--no-fuse-bn configure the PyTorch engine (use --engine torch)")
    if args.onnx and engine_flags:
        raise ValueError("--onnx checks an ONNX file; --precision/--compile/--cuda-graphs/--no-fuse-bn "
                         "configure the PyTorch engine instead (pick one)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.onnx and device != "cpu":
        raise ValueError(f"--onnx runs on onnxruntime's CPU provider; --device {device} does not apply")
    module, meta, _ = _load_source(args.checkpoint, 17, True)
    assert meta is not None  # a gated source is a checkpoint file (_load_source refuses a bare arch)
    name, eval_set = _gate_set(args, meta, find_dataset)
    # the variant is built first: what the device cannot run (CUDA graphs on a CPU) fails before any scoring
    if args.onnx:
        engine = build_engine(args.onnx, "cpu", "fp32", backend="onnxruntime")
    elif args.engine != "torch":  # the service's resolver: OpenVINO (or torch) behind the agreement gate
        from ditepose.model.engines.select import build_chosen_engine

        width, height = meta.input_size
        engine = build_chosen_engine(module, device, args.precision, args.engine, (height, width))[0]
    else:
        engine = build_engine(module, device, args.precision, compile=args.compile, cuda_graphs=args.cuda_graphs,
                              fuse_bn=not args.no_fuse_bn)
    info = _variant(engine)
    report = gate(module_infer(module.to(device)), engine, eval_set, name, candidate_label=info["label"],
                  variant=info, margin=args.gate_margin, flip=not args.gate_no_flip, batch_size=args.gate_batch)
    _report_gate(report, args.gate_report)
    if not report.passed:
        print(f"ditepose export: {report.verdict()}", file=sys.stderr)
        return 1
    return 0


def _add_gate_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--gate", required=required, metavar="DATASET",
                        help="score PyTorch and the export on this set and refuse the export when it falls more "
                        "than --gate-margin below: a data folder (the `ditepose evaluate --data` layout) or a "
                        "dataset name of the evaluation catalogue (DITEPOSE_DATASETS, demo-synthetic)")
    parser.add_argument("--gate-margin", type=float, default=None, metavar="DROP",
                        help="largest allowed drop of the primary metric, in its units (default: 0.005 COCO AP, "
                        "0.5 MPII PCKh points)")
    parser.add_argument("--gate-split", default="val", help="split of a --gate data folder (default val)")
    parser.add_argument("--gate-max-images", type=whole_number(1), default=None,
                        help="COCO: score the first N images only")
    parser.add_argument("--gate-batch", type=whole_number(1), default=32, help="crops per inference call")
    parser.add_argument("--gate-no-flip", action="store_true", help="score without the flip test")
    parser.add_argument("--gate-report", metavar="FILE", help="also write the gate's JSON report here")


def _register_onnx(formats: argparse._SubParsersAction, find_dataset: DatasetLookup | None) -> None:
    onnx = formats.add_parser("onnx", help="ONNX (onnxruntime, TensorRT, ...)")
    onnx.add_argument("source", metavar="CHECKPOINT_OR_ARCH", help="a checkpoint file or a registered arch name")
    onnx.add_argument("--out", required=True, help="output .onnx path")
    onnx.add_argument("--input", type=parse_size, default=None,
                      help="input size HxW (default: the checkpoint's, else 256x192)")
    onnx.add_argument("--dynamic-batch", action="store_true", help="a symbolic batch axis (default: fixed --batch)")
    onnx.add_argument("--batch", type=int, default=1, help="fixed batch size without --dynamic-batch")
    onnx.add_argument("--joints", type=int, default=17, help="joints when exporting a bare arch")
    onnx.add_argument("--plain", action="store_true", help="export the unoptimised reference graph (fixed batch)")
    onnx.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch after export")
    _add_gate_options(onnx, required=False)
    onnx.set_defaults(func=partial(_export_onnx, find_dataset=find_dataset))


def _register_check(formats: argparse._SubParsersAction, find_dataset: DatasetLookup | None) -> None:
    check = formats.add_parser(
        "check", help="gate an ONNX file or an engine variant against PyTorch on a dataset",
        description="Score the PyTorch model and a variant (an ONNX file, wherever it was converted, or the "
        "serving engine in fp16/bf16, compiled or with CUDA graphs) through the evaluation loop of "
        "`ditepose evaluate`; print both tables and exit 1 when the variant falls more than --gate-margin "
        "below PyTorch.",
    )
    check.add_argument("checkpoint", help="the checkpoint the variant was made from")
    check.add_argument("--onnx", metavar="FILE", help="an ONNX heatmap model (input [N,3,H,W], output heatmaps)")
    check.add_argument("--device", default=None, help="torch device of the engine and PyTorch (default: cuda if "
                       "available, else cpu)")
    check.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="engine precision: fp32, or fp16/bf16 under autocast (on a CPU too)")
    check.add_argument("--compile", action="store_true", help="engine with torch.compile")
    check.add_argument("--cuda-graphs", action="store_true", help="engine replaying CUDA graphs (CUDA only)")
    check.add_argument("--no-fuse-bn", action="store_true", help="engine without BN folding / fast kernels")
    check.add_argument("--engine", choices=ENGINE_SETTINGS, default="torch",
                       help="torch (default): the PyTorch engine these flags configure; openvino or auto: the "
                       "engine the service would serve at --precision, after its agreement gate")
    _add_gate_options(check, required=True)
    check.set_defaults(func=partial(_export_check, find_dataset=find_dataset))


def register(subparsers: argparse._SubParsersAction, find_dataset: DatasetLookup | None = None) -> None:
    """``export onnx`` and ``export check``; ``find_dataset`` resolves ``--gate NAME`` (None: folders only)."""
    export = subparsers.add_parser("export", help="export a model for other runtimes; gate exports on accuracy")
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    _register_onnx(formats, find_dataset)
    _register_check(formats, find_dataset)
