"""Model sub-commands: ``model-info``, ``export onnx`` (and the pipeline's ``predict``)."""

from __future__ import annotations

import argparse
import json


def parse_size(text: str) -> tuple[int, int]:
    """'256x192' (HxW, as the paper writes sizes) -> (W, H)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 256x192 (HxW), got {text!r}") from None
    return width, height


def _model_info(args: argparse.Namespace) -> int:
    from model.complexity import count_macs, count_parameters
    from model.registry import build_model

    module = build_model(args.arch, num_joints=args.joints)
    width, height = args.input
    module.check_input_size(height, width)
    info = {
        "arch": args.arch,
        "num_joints": args.joints,
        "input_hw": [height, width],
        "heatmap_hw": [height // 4, width // 4],
        "params": count_parameters(module),
        "macs": count_macs(module, (width, height)),
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{info['arch']}: {info['params'] / 1e6:.3f} M params, {info['macs'] / 1e6:.1f} M MACs "
              f"at {height}x{width} (heatmaps {height // 4}x{width // 4}, {args.joints} joints)")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from model.checkpoint import load_pose_model
    from model.export import export_onnx, max_abs_diff_vs_torch
    from model.registry import build_model, list_models

    if args.source in list_models():
        module = build_model(args.source, num_joints=args.joints).eval()
        default_wh = (192, 256)
    else:
        if not Path(args.source).exists():
            raise FileNotFoundError(f"{args.source!r} is neither a checkpoint file nor an arch ({list_models()})")
        module, meta = load_pose_model(args.source)
        default_wh = meta.input_size
    width, height = args.input or default_wh
    path = export_onnx(module, args.out, (height, width), dynamic_batch=args.dynamic_batch,
                       optimized=not args.plain, batch=args.batch)
    print(f"wrote {path} (input {height}x{width}, batch {'dynamic' if args.dynamic_batch else args.batch}, "
          f"{'plain' if args.plain else 'optimised'} graph)")
    if args.check:
        sizes = [1, 3] if args.dynamic_batch else [args.batch]
        for size in sizes:
            diff = max_abs_diff_vs_torch(module, path, torch.randn(size, 3, height, width))
            print(f"check: batch {size}: max |onnxruntime - torch| = {diff:.2e}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from model.registry import list_models

    info = subparsers.add_parser("model-info", help="print parameters and multiply-accumulates of a variant")
    info.add_argument("arch", nargs="?", default="dite_hrnet_18", choices=list_models())
    info.add_argument("--input", type=parse_size, default=(192, 256), help="input size HxW (default 256x192)")
    info.add_argument("--joints", type=int, default=17)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_model_info)

    export = subparsers.add_parser("export", help="export a model for other runtimes")
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
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
    onnx.set_defaults(func=_export_onnx)
