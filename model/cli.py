"""Model sub-commands: ``model-info`` (and the pipeline's ``predict``)."""

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


def register(subparsers: argparse._SubParsersAction) -> None:
    from model.registry import list_models

    info = subparsers.add_parser("model-info", help="print parameters and multiply-accumulates of a variant")
    info.add_argument("arch", nargs="?", default="dite_hrnet_18", choices=list_models())
    info.add_argument("--input", type=parse_size, default=(192, 256), help="input size HxW (default 256x192)")
    info.add_argument("--joints", type=int, default=17)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_model_info)
