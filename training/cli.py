"""Training sub-commands: ``train``, ``evaluate``, ``evaluate-detector``, ``publish`` and ``synth``
(heavy imports inside the commands)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ditepose.model.arguments import parse_size, whole_number
from ditepose.model.engines.setting import ENGINE_SETTINGS

BOX_CHOICES = ("gt", "detections", "detector")  # ditepose.training.boxes.BOX_SOURCES (not imported: --help stays fast)

if TYPE_CHECKING:
    from ditepose.training.boxes import BoxSource
    from ditepose.training.config import TrainConfig
    from ditepose.training.data_layout import SplitFiles


def _resolve_config(name: str, dataset: str | None) -> TrainConfig:
    from ditepose.training.config import get_config

    if name in ("dite_hrnet_18", "dite_hrnet_30"):  # a bare variant: its paper recipe for the dataset
        ds = dataset or "coco"
        name = f"{name}_{ds}_256x192" if ds == "coco" else f"{name}_{ds}_256x256"
    cfg = get_config(name)
    if dataset and dataset != cfg.dataset:
        raise ValueError(f"config {name} is for {cfg.dataset}, not {dataset}")
    return cfg


def _epochs_list(text: str) -> tuple[int, ...]:
    """``--lr-steps`` type: ``'57,67'`` -> ``(57, 67)`` (increasing epochs; empty: no step)."""
    try:
        steps = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"lr steps must look like 170,200 (epochs), got {text!r}") from None
    if any(s < 0 for s in steps) or list(steps) != sorted(steps):
        raise argparse.ArgumentTypeError(f"lr steps must be increasing epochs >= 0, got {text!r}")
    return steps




def _train(args: argparse.Namespace) -> int:
    from ditepose.training.augment import AugmentConfig
    from ditepose.training.trainer import Trainer, cleanup_distributed

    cfg = _resolve_config(args.config, args.dataset)
    overrides = {
        "epochs": args.epochs, "global_batch": args.global_batch, "per_device_batch": args.per_device_batch,
        "lr": args.lr, "workers": args.workers, "amp": args.amp,
        "max_iters": args.max_iters, "seed": args.seed, "input_size": args.input, "max_people": args.max_people,
        "eval_every": args.eval_every, "log_every": args.log_every, "grad_clip": args.grad_clip,
        "ema_decay": args.ema, "warmup_iters": args.warmup_iters, "lr_steps": args.lr_steps,
        "checkpoint_every": args.checkpoint_every,
        "det_file": args.det_file, "test_boxes": args.test_boxes,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_aug:
        overrides["augment"] = AugmentConfig.none(cfg.augment.sigma)
    if args.sync_bn:
        overrides["sync_bn"] = True
    if args.scale_lr:
        overrides["scale_lr"] = True
    if args.no_flip:
        overrides["flip_test"] = False
    if args.model_overrides:
        overrides["model_overrides"] = json.loads(args.model_overrides)
    cfg = cfg.replace(**overrides)
    _check_test_boxes(cfg, args)
    try:
        trainer = Trainer(cfg, args.data, args.work_dir, device=args.device, resume=args.resume or None,
                          progress=not args.quiet, publish=args.publish)
        summary = trainer.fit()
    finally:
        cleanup_distributed()
    if trainer.is_main:
        print(json.dumps(summary))
        errors = summary.get("publish", {}).get("errors")
        if errors:
            print(f"ditepose train: error: {len(errors)} best checkpoint(s) not published to {args.publish}: "
                  + "; ".join(errors), file=sys.stderr)
            return 1
    return 0


def _check_test_boxes(cfg: TrainConfig, args: argparse.Namespace) -> None:
    """What the end-of-training test needs, checked before hours of training rather than after.

    The recipe's own detections file may be absent (the test then scores GT boxes and says so),
    but one named on the command line, or asked for with ``--test-boxes detections``, must exist;
    ``--test-boxes detector`` needs the detector's weights."""
    from ditepose.training.data_layout import resolve_det_file

    explicit = bool(args.det_file or args.test_boxes)
    if (cfg.dataset == "coco" and cfg.test_boxes == "detections" and explicit
            and resolve_det_file(cfg, Path(args.data)) is None):
        raise FileNotFoundError(f"detections file {cfg.det_file} not found (absolute, or relative to --data "
                                f"{args.data}); the end-of-training test needs it for --test-boxes detections")
    if cfg.test_boxes == "detector":
        from ditepose.training.boxes import BoxSource, make_detector

        make_detector(BoxSource("detector"))  # WeightsMissing names the fetch command


def _box_source(args: argparse.Namespace) -> BoxSource:
    """``--boxes`` with ``--det-file`` / ``--detector`` / ``--det-score-thr`` (``--det-file`` alone: detections)."""
    from ditepose.training.boxes import BoxSource

    return BoxSource.parse(args.boxes, args.det_file, args.detector, args.det_score_thr)


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from ditepose.model import load_pose_model
    from ditepose.model.pipeline import module_infer
    from ditepose.training.boxes import evaluation_set
    from ditepose.training.evaluate import pipeline_for, predict, score

    boxes = _box_source(args)  # bad box options fail before the checkpoint loads
    if args.ann is None and args.data is None:
        raise ValueError("evaluate needs --data DIR or --ann FILE (with --img-dir)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_pose_model(args.checkpoint, map_location=device)
    model.to(device)
    files = _data_files(args, meta.dataset, "evaluate")
    gt = args.gt or files.gt_file
    eval_set = evaluation_set(meta.dataset, files.ann_file, files.img_dir, meta.input_size, boxes, gt_file=gt,
                              max_images=args.max_images, device=device, detector_batch=args.detector_batch)
    ds = eval_set.dataset
    if args.engine == "eager":
        infer = module_infer(model)
    else:  # the service's resolver: OpenVINO on a CPU where installed and agreeing, else the torch engine
        from ditepose.model.engines.select import build_chosen_engine

        width, height = meta.input_size
        infer = build_chosen_engine(model.eval(), device, "auto", args.engine, (height, width))[0]
    preds = predict(infer, ds, pipeline_for(ds, not args.no_flip, args.decoder), args.batch_size)
    table = score(ds, preds, eval_set.gt_file)
    plots: list[str] = []
    if args.plots:
        from ditepose.training.datasets import CocoKeypointDataset
        from ditepose.training.eval_breakdown import write_evaluation_plots

        coco_gt = ds.coco if isinstance(ds, CocoKeypointDataset) else None
        plots = [str(p) for p in write_evaluation_plots(args.plots, meta.dataset, preds, table, coco_gt=coco_gt)]
    print(json.dumps({"checkpoint": str(args.checkpoint), "dataset": meta.dataset, "samples": len(ds),
                      **eval_set.describe(), "max_images": args.max_images, "flip": not args.no_flip,
                      "decoder": args.decoder, "metrics": table, "plots": plots}))
    return 0


def _data_files(args: argparse.Namespace, dataset: str, command: str) -> SplitFiles:
    """The annotation file and image folder of ``--data``/``--split``, or of ``--ann``/``--img-dir``
    (each overrides its half of ``--data``), and the split's ground-truth file when ``--data`` gives one."""
    if args.ann is None and args.data is None:
        raise ValueError(f"{command} needs --data DIR or --ann FILE (with --img-dir)")
    if args.img_dir is None and args.data is None:
        raise ValueError("--ann needs --img-dir (or --data)")
    from ditepose.training.data_layout import SplitFiles, find_split

    if args.data is None:
        return SplitFiles(Path(args.ann), Path(args.img_dir))
    layout = find_split(args.data, dataset, args.split)
    return SplitFiles(Path(args.ann) if args.ann else layout.ann_file,
                      Path(args.img_dir) if args.img_dir else layout.img_dir, layout.gt_file)


def _evaluate_detector(args: argparse.Namespace) -> int:
    import torch

    from ditepose.training.boxes import BoxSource, make_detector
    from ditepose.training.detection_eval import evaluate_detector

    source = BoxSource("detector", score_thr=args.det_score_thr, detector=args.detector)
    files = _data_files(args, "coco", "evaluate-detector")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = evaluate_detector(make_detector(source, device), files.ann_file, files.img_dir, args.max_images,
                               args.batch_size)
    print(json.dumps({"annotations": str(files.ann_file), "device": device, **report}))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from ditepose.training.synth import synthesize

    ann = synthesize(args.format, args.out, args.num_images, seed=args.seed, split=args.split)
    written = [str(ann)]
    if args.val_images:
        written.append(str(synthesize(args.format, args.out, args.val_images, seed=args.seed + 100_003, split="val")))
    print(json.dumps({"format": args.format, "annotations": written}))
    return 0


def _publish(args: argparse.Namespace) -> int:
    """Publish an existing checkpoint (a past run's, the authors') once it is known to load."""
    from ditepose.model import load_pose_model
    from ditepose.model.repository import MANIFEST_NAME, ModelManifest, publish_version, write_manifest

    model_dir: Path = args.model_dir
    if model_dir.name.startswith(".") or model_dir.name in ("", ".."):
        raise ValueError(f"{model_dir}: the model folder's name {model_dir.name!r} is hidden from the service "
                         "(readers skip dot-folders); name the model, e.g. REPOSITORY/pose")
    metadata = json.loads(args.metadata or "{}")
    if not isinstance(metadata, dict):
        raise ValueError(f"--metadata must be a JSON object, got {args.metadata!r}")
    module, meta = load_pose_model(args.checkpoint)  # CheckpointError (a ValueError) names what does not fit
    input_size = args.input or meta.input_size
    from ditepose.model.dite_hrnet import TopDownPoseNet

    assert isinstance(module, TopDownPoseNet)  # what load_pose_model builds (typed as any nn.Module)
    module.check_input_size(input_size[1], input_size[0])
    manifest_path = model_dir / MANIFEST_NAME
    manifest = ModelManifest.from_file(manifest_path) if manifest_path.exists() else None
    if manifest is None:
        write_manifest(model_dir, ModelManifest(arch=meta.arch, dataset=meta.dataset, input_size=input_size))
    elif args.input and manifest.input_size not in (None, args.input):
        raise ValueError(f"{manifest_path} serves input_size {manifest.to_dict()['input_size']}, not "
                         f"{args.input[1]}x{args.input[0]}; edit the manifest first")
    metadata = {"source": str(Path(args.checkpoint).resolve()), **metadata}
    version = publish_version(model_dir, Path(args.checkpoint), metadata=metadata)
    print(json.dumps({"model_dir": str(model_dir), "version": version,
                      "checkpoint": str(model_dir / str(version)), "arch": meta.arch, "dataset": meta.dataset}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the training package's sub-commands to the ``ditepose`` parser."""
    _add_train(subparsers)
    _add_evaluate(subparsers)
    _add_evaluate_detector(subparsers)
    _add_publish(subparsers)
    _add_synth(subparsers)


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    """The `train` command."""
    train = subparsers.add_parser("train", help="train a Dite-HRNet recipe (single process or torchrun DDP)")
    train.add_argument("config", help="recipe name (e.g. dite_hrnet_18_coco_256x192), variant, or .json file")
    train.add_argument("--data", required=True, help="dataset folder (COCO or MPII layout, or `ditepose synth` output)")
    train.add_argument("--work-dir", required=True)
    train.add_argument("--dataset", choices=["coco", "mpii"], default=None)
    train.add_argument("--epochs", type=int)
    train.add_argument("--global-batch", type=int,
                       help="samples per optimizer step over all processes (recipe: 256 = the authors' 8 x 32)")
    train.add_argument("--per-device-batch", type=int,
                       help="micro-batch per process; less than global/processes accumulates gradients")
    train.add_argument("--lr", type=float, help="peak lr for the recipe's global batch (recipe: 2e-3)")
    train.add_argument("--scale-lr", action="store_true",
                       help="linear scaling rule: lr x global-batch / 256 (off: lr is used as given)")
    train.add_argument("--amp", choices=["none", "bf16", "fp16"],
                       help="mixed precision (recipe: none = fp32, as the authors; fp16 needs CUDA)")
    train.add_argument("--workers", type=int, help="data-loader workers per process (recipe: 6)")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    train.add_argument("--resume", nargs="?", const=True, default=None,
                       help="resume from WORK_DIR/latest_state.pt (or the given file)")
    train.add_argument("--max-iters", type=int)
    train.add_argument("--max-people", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--input", type=parse_size, help="input size HxW, e.g. 256x192")
    train.add_argument("--eval-every", type=int, help="epochs; 0 = never")
    train.add_argument("--log-every", type=int, help="iterations")
    train.add_argument("--warmup-iters", type=int)
    train.add_argument("--lr-steps", type=_epochs_list, metavar="E1,E2",
                       help="epochs (0-based) where the lr drops x0.1 (recipe: 170,200 of 270); scale them "
                       "with a shorter --epochs")
    train.add_argument("--checkpoint-every", type=int, help="epochs between epoch_N.pt snapshots; 0 = none")
    train.add_argument("--det-file", help="person detections json for the end-of-training COCO test "
                       "(recipe: DATA/person_detection_results/COCO_val2017_detections_AP_H_56_person.json)")
    train.add_argument("--test-boxes", choices=BOX_CHOICES,
                       help="boxes of the end-of-training evaluation, as `evaluate --boxes` (recipe: detections "
                       "on COCO, gt on MPII; detector = NanoDet at its threshold); periodic validation stays gt")
    train.add_argument("--grad-clip", type=float)
    train.add_argument("--ema", type=float, help="EMA decay, e.g. 0.999")
    train.add_argument("--sync-bn", action="store_true")
    train.add_argument("--no-aug", action="store_true", help="no random augmentation")
    train.add_argument("--no-flip", action="store_true", help="no flip test at evaluation")
    train.add_argument("--model-overrides", help="JSON dict of DiteHRNetConfig fields (e.g. a tiny net)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--publish", metavar="REPOSITORY/NAME", type=Path,
                       help="write each new best checkpoint (by validation) as the next version of model NAME in a "
                       "model repository, atomically; writes a manifest.json describing how to serve it when the "
                       "model has none (docs/operations.md, Model repository)")
    train.set_defaults(func=_train)


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    """The `evaluate` command."""
    ev = subparsers.add_parser("evaluate", help="COCO AP / MPII PCKh of a checkpoint, printed as JSON")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", help="dataset folder (its val split is used unless --ann)")
    ev.add_argument("--split", default="val")
    ev.add_argument("--ann", help="annotation file (overrides --data)")
    ev.add_argument("--img-dir", help="image folder (with --ann)")
    ev.add_argument("--boxes", choices=BOX_CHOICES,
                    help="person boxes to crop: gt (annotated), detections (--det-file; the paper's protocol) or "
                    "detector (a live detector, --detector; the result adds its report). Default: detections with "
                    "--det-file, else gt. MPII: gt only")
    ev.add_argument("--det-file", help="COCO detections json [{image_id,bbox,score,category_id}] for --boxes detections")
    ev.add_argument("--detector", help="the live detector of --boxes detector (default nanodet): nanodet, hog, "
                    "whole or torchvision")
    ev.add_argument("--det-score-thr", type=float, default=None,
                    help="boxes scoring below it are dropped: detections default 0.0 (the authors' det_bbox_thr), "
                    "detector default its own (NanoDet 0.3)")
    ev.add_argument("--detector-batch", type=whole_number(1), default=8, help="images per detector forward pass")
    ev.add_argument("--max-images", type=whole_number(1),
                    help="COCO: the first N images (by id) that hold people, scored on those alone (quick checks)")
    ev.add_argument("--gt", help="MPII ground truth (.json/.npz/.mat)")
    ev.add_argument("--no-flip", action="store_true")
    ev.add_argument("--decoder", default="default", choices=["default", "dark", "argmax"])
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--device", default=None)
    ev.add_argument("--engine", choices=("eager", *ENGINE_SETTINGS), default="eager",
                    help="eager (default): the network as trained, the authors' protocol; auto, openvino or torch: "
                    "the engine the service serves (auto: OpenVINO on a CPU where installed and agreeing)")
    ev.add_argument("--plots", metavar="DIR", help="write per-joint accuracy and OKS histogram PNGs here")
    ev.set_defaults(func=_evaluate)


def _add_evaluate_detector(subparsers: argparse._SubParsersAction) -> None:
    """The `evaluate-detector` command."""
    dv = subparsers.add_parser("evaluate-detector", help="a person detector's recall, false positives, box AP "
                               "and time per image on a COCO keypoints set, printed as JSON")
    dv.add_argument("--data", help="COCO dataset folder (its val split is used unless --ann)")
    dv.add_argument("--split", default="val")
    dv.add_argument("--ann", help="COCO keypoints annotation file (overrides --data)")
    dv.add_argument("--img-dir", help="image folder (with --ann)")
    dv.add_argument("--detector", default="nanodet", help="nanodet (default), hog, whole or torchvision")
    dv.add_argument("--det-score-thr", type=float, default=None, help="the detector's threshold (default its own)")
    dv.add_argument("--max-images", type=whole_number(1), help="the first N images (by id) that hold people")
    dv.add_argument("--batch-size", type=whole_number(1), default=1,
                    help="images per forward pass (1: timed one image at a time, as bench/detector.py)")
    dv.add_argument("--device", default=None)
    dv.set_defaults(func=_evaluate_detector)


def _add_publish(subparsers: argparse._SubParsersAction) -> None:
    """The `publish` command."""
    pub = subparsers.add_parser("publish", help="add a checkpoint as the next version of a model in a model "
                                "repository, atomically, after checking that it loads")
    pub.add_argument("checkpoint", help="checkpoint file (ours or the authors' mmpose layout)")
    pub.add_argument("model_dir", metavar="REPOSITORY/NAME", type=Path, help="the model's folder in the repository")
    pub.add_argument("--input", type=parse_size, default=None,
                     help="input size HxW for the manifest written when the model has none (default: the "
                     "checkpoint's; authors' files carry none: 256x192 COCO, 256x256 MPII)")
    pub.add_argument("--metadata", help="JSON object stored in the version's version.json (e.g. a ticket)")
    pub.set_defaults(func=_publish)


def _add_synth(subparsers: argparse._SubParsersAction) -> None:
    """The `synth` command."""
    syn = subparsers.add_parser("synth", help="write a synthetic people dataset (COCO or MPII format)")
    syn.add_argument("--format", choices=["coco", "mpii"], default="coco")
    syn.add_argument("--out", required=True)
    syn.add_argument("--num-images", type=int, default=100)
    syn.add_argument("--val-images", type=int, default=0, help="also write a val split of this many images")
    syn.add_argument("--split", default="train")
    syn.add_argument("--seed", type=int, default=0)
    syn.set_defaults(func=_synth)
