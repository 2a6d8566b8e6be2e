"""The training loop: single process or torchrun DDP, a global batch, exact resume, evaluation.

Batches. Every optimizer step consumes one *global batch* of ``cfg.global_batch`` samples,
whatever the number of processes: the samples of epoch ``e`` are ``randperm(N)`` drawn from
``seed + e`` (torch's and mmpose's ``DistributedSampler`` order), padded by repetition to a
multiple of ``cfg.sampler_pad`` (the authors' 8 processes), cut into ``len // global_batch``
global batches (``drop_last``). A global batch is dealt to ``world_size x accumulation``
*lanes*: lane ``v = m * world_size + rank`` (rank ``rank``, micro-step ``m``) takes every
``lanes``-th sample from offset ``v``. With 8 processes and no accumulation that is exactly
mmpose's ``DistributedSampler`` + ``drop_last=True`` loader; with 1, 2 or 8 processes the step
sees the same 256 samples and the same learning rate. BatchNorm statistics are per lane (per
process, per micro-batch), as in the authors' runs; ``sync_bn`` is opt-in.

Randomness is a pure function of the seed: model init from ``seed``, the sample order of epoch
``e`` from ``seed + e``, augmentation from ``(seed, epoch, index)``. So a run resumed from
``latest_state.pt`` (even mid-epoch) replays the same batches and gives the same loss curve as
an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ditepose.model import CheckpointMeta, build_model, save_checkpoint
from ditepose.model.pipeline import TopDownPipeline, module_infer
from ditepose.model.repository import MANIFEST_NAME, ModelManifest, publish_version, write_manifest
from ditepose.training.config import (
    AUTHORS_GPU_BATCH,
    AUTHORS_REPO,
    TrainConfig,
    describe_differences,
    differences,
)
from ditepose.training.data_layout import find_split
from ditepose.training.datasets import CocoKeypointDataset, MpiiKeypointDataset, TopDownDataset
from ditepose.training.evaluate import predict, primary_metric, score
from ditepose.training.logs import MetricsLogger
from ditepose.training.loss import JointsMSELoss

STATE_FILE = "latest_state.pt"
EVAL_BATCH = 32  # the authors' val/test samples_per_gpu (no effect on the numbers)


log = logging.getLogger(__name__)


def lr_at(cfg: TrainConfig, epoch: int, global_iter: int) -> float:
    """mmcv 'step' policy with linear warm-up: base x gamma^(steps passed) x warm-up factor.

    ``global_iter`` counts optimizer steps (global batches), so the schedule is the same on any
    number of processes."""
    lr = cfg.base_lr * cfg.lr_gamma ** sum(1 for s in cfg.lr_steps if epoch >= s)
    if global_iter < cfg.warmup_iters:
        lr *= 1 - (1 - global_iter / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return lr


@dataclass(frozen=True)
class BatchLayout:
    """How one global batch is split: ``world_size`` processes x ``accumulation`` micro-batches of ``per_device``."""

    global_batch: int
    world_size: int
    per_device: int
    accumulation: int

    @property
    def lanes(self) -> int:
        return self.world_size * self.accumulation

    @classmethod
    def of(cls, cfg: TrainConfig, world_size: int) -> BatchLayout:
        g = cfg.global_batch
        if g % world_size:
            raise ValueError(f"global batch {g} is not divisible by {world_size} processes")
        share = g // world_size
        per_device = cfg.per_device_batch or share
        if share % per_device:
            raise ValueError(f"per-device batch {per_device} does not divide the {share} samples each of "
                             f"{world_size} processes takes from a global batch of {g}")
        if per_device < 2:
            raise ValueError("a per-device batch of 1 breaks BatchNorm on the 1x1 attention maps; use >= 2")
        return cls(g, world_size, per_device, share // per_device)


def epoch_order(num_samples: int, cfg: TrainConfig, epoch: int) -> list[int]:
    """The epoch's permutation (torch ``DistributedSampler``: ``randperm`` from ``seed + epoch``),
    padded by repeating its head to a multiple of ``cfg.sampler_pad``."""
    g = torch.Generator().manual_seed(cfg.seed + epoch)
    order = torch.randperm(num_samples, generator=g).tolist()
    pad = (-len(order)) % cfg.sampler_pad
    while pad and order:
        head = order[:pad]
        order += head
        pad -= len(head)
    return order


def steps_per_epoch(num_samples: int, cfg: TrainConfig) -> int:
    """Full global batches per epoch (the last partial one is dropped)."""
    return (num_samples + (-num_samples) % cfg.sampler_pad) // cfg.global_batch


def micro_batches(order: list[int], layout: BatchLayout, step: int, rank: int) -> list[list[int]]:
    """The ``accumulation`` micro-batches of ``rank`` for global batch ``step`` of ``order``."""
    chunk = order[step * layout.global_batch:(step + 1) * layout.global_batch]
    return [chunk[m * layout.world_size + rank::layout.lanes] for m in range(layout.accumulation)]


def build_dataset(cfg: TrainConfig, data_dir: Path, split: str, train: bool) -> tuple[TopDownDataset, Path | None]:
    layout = find_split(data_dir, cfg.dataset, split)
    if cfg.dataset == "coco":
        ds: TopDownDataset = CocoKeypointDataset(
            layout.ann_file, layout.img_dir, cfg.input_size, train=train, recipe=cfg.augment, seed=cfg.seed,
            max_people=cfg.max_people if train else None)
    else:
        ds = MpiiKeypointDataset(layout.ann_file, layout.img_dir, cfg.input_size, train=train, recipe=cfg.augment,
                                 seed=cfg.seed, max_people=cfg.max_people if train else None)
    return ds, layout.gt_file


def resolve_det_file(cfg: TrainConfig, data_dir: Path) -> Path | None:
    """The recipe's detections file (absolute, or relative to the data folder), if it exists."""
    if cfg.det_file is None:
        return None
    path = Path(cfg.det_file)
    if not path.is_absolute():
        path = data_dir / path
    return path if path.is_file() else None


class EMA:
    """Exponential moving average of the weights (buffers copied), used for evaluation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
            else:
                e.copy_(p)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def serving_manifest(cfg: TrainConfig) -> ModelManifest:
    """How to serve what ``cfg`` trains: its architecture, dataset, input size, flip test and decoder
    (the ones its validation scores used); the version stays 'latest' so each publish goes live."""
    return ModelManifest(arch=cfg.arch, dataset=cfg.dataset, input_size=cfg.input_size,
                         flip_test=cfg.flip_test, decoder=cfg.decoder)


class BestPublisher:
    """Publishes each new best checkpoint of a run as the next version of a repository model.

    The model folder's manifest, when there is one, is the operator's (a pin, serving options) and
    is left alone, but a manifest that would serve the published checkpoints at another input size,
    architecture or keypoint layout is refused before training starts rather than after.
    """

    def __init__(self, model_dir: str | Path, cfg: TrainConfig) -> None:
        self.model_dir = Path(model_dir)
        if self.model_dir.name.startswith(".") or self.model_dir.name in ("", ".."):
            raise ValueError(f"--publish {model_dir}: the model folder's name {self.model_dir.name!r} is hidden "
                             "from the service (readers skip dot-folders); name the model, e.g. REPOSITORY/pose")
        if self.model_dir.exists() and not self.model_dir.is_dir():
            raise ValueError(f"--publish {model_dir}: not a folder")
        self.cfg = cfg
        ours = serving_manifest(cfg)
        self.manifest_path = self.model_dir / MANIFEST_NAME
        if self.manifest_path.exists():
            theirs = ModelManifest.from_file(self.manifest_path)
            clash = [key for key in ("arch", "dataset", "input_size")
                     if getattr(theirs, key) is not None and getattr(theirs, key) != getattr(ours, key)]
            if clash:
                shown = {k: (ours.to_dict().get(k), theirs.to_dict().get(k)) for k in clash}
                raise ValueError(f"--publish {model_dir}: {self.manifest_path} serves {clash} differently from "
                                 f"this run (run, manifest): {shown}; edit the manifest or publish to another name")
            if theirs.pinned:
                _say(f"note: {self.manifest_path} pins version {theirs.version}; published versions are not "
                     "served until the pin is changed")
        self.published: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def publish(self, checkpoint: Path, best: dict[str, Any], iterations: int, work_dir: Path) -> int | None:
        """Publish ``checkpoint``; a failure is reported and recorded, never the end of the run."""
        metadata = {"metric": best.get("metric"), "value": best.get("value"), "epoch": best.get("epoch"),
                    "iterations": iterations, "recipe": self.cfg.name, "work_dir": str(work_dir),
                    "source": checkpoint.name}
        try:
            self.model_dir.mkdir(parents=True, exist_ok=True)
            if not self.manifest_path.exists():
                write_manifest(self.model_dir, serving_manifest(self.cfg))
            version = publish_version(self.model_dir, checkpoint, metadata=metadata)
        except OSError as exc:  # a full disk or a lost mount must not cost the run (best.pt stays)
            message = f"epoch {best.get('epoch')}: {type(exc).__name__}: {exc}"
            self.errors.append(message)
            _say(f"!!! publishing the new best checkpoint to {self.model_dir} failed ({message}); "
                 f"it stays at {checkpoint}")
            return None
        self.published.append({"version": version, **{k: metadata[k] for k in ("metric", "value", "epoch")}})
        _say(f"published best checkpoint ({metadata['metric']} {metadata['value']:.4f}, epoch {metadata['epoch']}) "
             f"as {self.model_dir / str(version)}")
        return version

    def summary(self) -> dict[str, Any]:
        return {"model_dir": str(self.model_dir), "versions": self.published, "errors": self.errors}


class Trainer:
    """Train ``cfg`` on ``data_dir`` writing checkpoints and logs to ``work_dir``."""

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, work_dir: str | Path,
                 device: str | None = None, resume: str | Path | bool | None = None, progress: bool = True,
                 publish: str | Path | None = None) -> None:
        self.cfg = cfg
        self.data_dir, self.work_dir = Path(data_dir), Path(work_dir)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed = self.world_size > 1
        self.rank = int(os.environ.get("RANK", "0"))
        self.layout = BatchLayout.of(cfg, self.world_size)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and self.distributed:
            self.device = torch.device("cuda", local_rank)
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp 'fp16' needs CUDA (GradScaler); use 'bf16' or 'none' on CPU")
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.work_dir.mkdir(parents=True, exist_ok=True)

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model: nn.Module = build_model(cfg.arch, num_joints=cfg.num_joints, **cfg.model_overrides)
        if cfg.sync_bn and self.distributed:
            if self.device.type != "cuda":
                raise ValueError("sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel)")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.base_lr, weight_decay=cfg.weight_decay)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.criterion = JointsMSELoss(use_target_weight=True)

        self.train_set, _ = build_dataset(cfg, self.data_dir, "train", train=True)
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), cfg)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_set)} training samples in {self.data_dir} do not fill one global "
                             f"batch of {cfg.global_batch} (the last partial batch is dropped); lower global_batch")
        try:
            self.val_set, self.val_gt = build_dataset(cfg, self.data_dir, "val", train=False)
        except FileNotFoundError:
            self.val_set, self.val_gt = None, None
        # --publish: each new best (by validation) becomes the next version of a repository model.
        self.publisher: BestPublisher | None = None
        if publish is not None:
            if self.val_set is None or not cfg.eval_every:
                why = f"no val split in {self.data_dir}" if self.val_set is None else "eval_every is 0"
                raise ValueError(f"--publish publishes new best checkpoints, which need validation: {why}")
            if self.is_main:
                self.publisher = BestPublisher(publish, cfg)
        self.epoch, self.iter_in_epoch, self.global_iter = 0, 0, 0
        self.best: dict[str, Any] = {"metric": None, "value": None, "epoch": None}
        self.last_metrics: dict[str, float] = {}
        self.last_eval_epoch: int | None = None
        self.throughput: list[dict[str, Any]] = []
        if resume:
            self.load_state(self.work_dir / STATE_FILE if resume is True else Path(resume))
        self.ddp: nn.Module = self.model
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Dite-HRNet has parameters that never get a gradient (as in the official code: the DCM
            # mask conv of the branch that the module's output does not use), hence find_unused_parameters.
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)
        self.logger = MetricsLogger(self.work_dir, enabled=self.is_main)
        if self.is_main:
            self._announce()

    # ---------------------------------------------------------------- recipe
    def run_info(self) -> dict[str, Any]:
        """What this run is: the recipe, what it changes from the authors', the batch layout, the precision."""
        lay = self.layout
        notes = []
        if lay.per_device != AUTHORS_GPU_BATCH:
            notes.append(f"BatchNorm sees {lay.per_device} samples per forward (authors: {AUTHORS_GPU_BATCH} per GPU)")
        if self.cfg.sync_bn and self.distributed:
            notes.append("BatchNorm statistics synchronised across processes (authors: per process)")
        return {
            "recipe": self.cfg.name, "reproduces": f"{AUTHORS_REPO}/{self.cfg.reproduces}" if self.cfg.reproduces
            else None,
            "differs_from_authors": differences(self.cfg), "layout": asdict(lay), "layout_notes": notes,
            "amp": self.cfg.amp, "lr": self.cfg.base_lr, "steps_per_epoch": self.steps_per_epoch,
            "train_samples": len(self.train_set), "device": str(self.device),
        }

    def _announce(self) -> None:
        info = self.run_info()
        lay = self.layout
        precision = "fp32" if self.cfg.amp == "none" else f"{self.cfg.amp} autocast"
        _say(f"recipe {self.cfg.name} (reproduces {info['reproduces'] or 'no authors config'}): "
             f"global batch {lay.global_batch} = {lay.world_size} process(es) x {lay.per_device} "
             f"x {lay.accumulation} accumulation; lr {self.cfg.base_lr:g}; {precision}; "
             f"{self.steps_per_epoch} steps/epoch on {len(self.train_set)} samples")
        diff = describe_differences(self.cfg)
        _say("differs from the authors' config:\n" + diff if diff else "identical to the authors' config")
        for note in info["layout_notes"]:
            _say(f"  note: {note}")
        (self.work_dir / "recipe.json").write_text(json.dumps({**info, "config": self.cfg.to_dict()}, indent=2))

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "ema": self.ema.module.state_dict() if self.ema else None,
            "epoch": self.epoch, "iter_in_epoch": self.iter_in_epoch, "global_iter": self.global_iter,
            "best": json.dumps(self.best), "config": json.dumps(self.cfg.to_dict()),
            "layout": json.dumps(asdict(self.layout)),
            "scheduler": {"policy": "step+linear-warmup", "lr": lr_at(self.cfg, self.epoch, self.global_iter)},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                "python": json.dumps(random.getstate()),
            },
        }

    def load_state(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"no resumable state at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(state["config"])
        current = json.loads(json.dumps(self.cfg.to_dict()))
        # The batch layout (processes, per-device batch) may change: the global batches stay the same.
        clash = [k for k in ("arch", "dataset", "input_size", "model_overrides", "global_batch", "sampler_pad", "seed")
                 if saved.get(k) != current.get(k)]
        if clash:
            raise ValueError(f"cannot resume from {path}: recipe differs in {clash} "
                             f"(saved {[saved.get(k) for k in clash]}, now {[current.get(k) for k in clash]})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema and state.get("ema"):
            self.ema.module.load_state_dict(state["ema"])
        self.epoch, self.iter_in_epoch = int(state["epoch"]), int(state["iter_in_epoch"])
        self.global_iter = int(state["global_iter"])
        self.best = json.loads(state["best"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        n = rng["numpy"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
        py = json.loads(rng["python"])
        random.setstate((py[0], tuple(py[1]), py[2]))

    def save_state(self) -> None:
        if self.is_main:
            tmp = self.work_dir / (STATE_FILE + ".tmp")
            torch.save(self.state_dict(), tmp)
            tmp.replace(self.work_dir / STATE_FILE)

    def meta(self, metrics: dict[str, float] | None = None, boxes: dict[str, Any] | None = None) -> CheckpointMeta:
        """Checkpoint metadata; ``boxes``: the ``box_source`` record of ``metrics`` (None: GT boxes),
        stored with its older one-string label ``boxes`` (:mod:`ditepose.training.boxes`)."""
        from ditepose.training.boxes import box_label, box_record

        record = box_record(boxes)
        return CheckpointMeta(
            arch=self.cfg.arch, dataset=self.cfg.dataset, num_joints=self.cfg.num_joints,
            input_size=self.cfg.input_size, overrides=dict(self.cfg.model_overrides),
            extra={"recipe": self.cfg.to_dict(), "reproduces": self.cfg.reproduces, "amp": self.cfg.amp,
                   "differs_from_authors": differences(self.cfg), "layout": asdict(self.layout),
                   "metrics": metrics or {}, "boxes": box_label(record), "box_source": record, "epoch": self.epoch,
                   "iterations": self.global_iter})

    def eval_module(self) -> nn.Module:
        return self.ema.module if self.ema else self.model

    # ---------------------------------------------------------------- loop
    def _loader(self) -> DataLoader:
        """This process's micro-batches for the rest of the epoch (mid-epoch resume skips what was done)."""
        self.train_set.set_epoch(self.epoch)
        order = epoch_order(len(self.train_set), self.cfg, self.epoch)
        batches = [mb for step in range(self.iter_in_epoch, self.steps_per_epoch)
                   for mb in micro_batches(order, self.layout, step, self.rank)]
        return DataLoader(self.train_set, batch_sampler=batches, num_workers=self.cfg.workers,
                          pin_memory=self.cfg.pin_memory and self.device.type == "cuda")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _step(self, micro: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over this process's micro-batches; returns their mean loss (this process)."""
        lr = lr_at(self.cfg, self.epoch, self.global_iter)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        accumulation = len(micro)
        total = torch.zeros((), device=self.device)
        for m, batch in enumerate(micro):
            x = batch["input"].to(self.device, non_blocking=True)
            target = batch["target"].to(self.device, non_blocking=True)
            weight = batch["target_weight"].to(self.device, non_blocking=True)
            last = m == accumulation - 1
            sync = self.ddp.no_sync() if self.distributed and not last else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    out = self.ddp(x)
                loss = self.criterion(out.float(), target, weight)
                self.scaler.scale(loss / accumulation if accumulation > 1 else loss).backward()
            total += loss.detach()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema:
            self.ema.update(self.model)
        return total / accumulation

    def _global_mean(self, value: torch.Tensor) -> float:
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return float(value)

    def _eval_pipeline(self, dataset: TopDownDataset) -> TopDownPipeline:
        return TopDownPipeline(dataset.input_size_wh, dataset.spec, flip_test=self.cfg.flip_test,
                               decoder=self.cfg.decoder, shift_heatmap=self.cfg.shift_heatmap,
                               dark_kernel=self.cfg.modulate_kernel)

    def evaluate(self, dataset: TopDownDataset | None = None) -> dict[str, float]:
        """The metric table of the evaluated module (EMA if any) on ``dataset`` (default: val, GT boxes)."""
        dataset = dataset if dataset is not None else self.val_set
        if dataset is None:
            return {}
        module = self.eval_module()
        was_training = module.training
        try:
            preds = predict(module_infer(module), dataset, self._eval_pipeline(dataset), EVAL_BATCH)
        finally:
            module.train(was_training)
        return score(dataset, preds, self.val_gt)

    def test(self) -> dict[str, Any]:
        """The end-of-training evaluation: the paper's protocol (COCO: detection boxes) when it can.

        ``test_boxes``: 'detections' reads the detections file (missing: GT boxes, with a
        ``note``), 'detector' runs the default live detector over the val images, 'gt' the
        annotated boxes. Returns ``{"boxes": label, "box_source": record, "metrics": {...}}``
        (:mod:`ditepose.training.boxes`; plus ``detector_report`` for 'detector' and the ``note``)."""
        from ditepose.training.boxes import BoxSource, evaluation_set

        if self.val_set is None:
            return {}
        cfg = self.cfg
        result: dict[str, Any] = {}
        if cfg.dataset == "coco" and cfg.test_boxes in ("detections", "detector"):
            det = resolve_det_file(cfg, self.data_dir) if cfg.test_boxes == "detections" else None
            if cfg.test_boxes == "detector" or det is not None:
                source = BoxSource("detector") if det is None else BoxSource("detections", det, cfg.det_bbox_thr)
                layout = find_split(self.data_dir, "coco", "val")
                test_set = evaluation_set("coco", layout.ann_file, layout.img_dir, cfg.input_size, source,
                                          device=str(self.device))
                return {**test_set.describe(), "metrics": self.evaluate(test_set.dataset)}
            result["note"] = (f"detections file {cfg.det_file} not found (relative to {self.data_dir}); "
                              "scored on ground-truth boxes, which reads higher than the paper's protocol")
        if self.last_eval_epoch == self.epoch and self.last_metrics:
            metrics = self.last_metrics  # the final validation already scored this module on GT boxes
        else:
            metrics = self.evaluate()
        return {"boxes": "gt", "box_source": {"source": "gt"}, "metrics": metrics, **result}

    def _after_epoch(self) -> None:
        cfg = self.cfg
        last = self.epoch + 1 == cfg.epochs
        if self.val_set is not None and cfg.eval_every and ((self.epoch + 1) % cfg.eval_every == 0 or last):
            metrics = self.evaluate() if self.is_main else {}
            if self.is_main:
                key = primary_metric(self.val_set)
                self.logger.log({"kind": "eval", "epoch": self.epoch + 1, "iter": self.global_iter, "boxes": "gt",
                                 **metrics})
                self.last_metrics = metrics
                self.last_eval_epoch = self.epoch + 1
                if self.best["value"] is None or metrics[key] > self.best["value"]:
                    self.best = {"metric": key, "value": metrics[key], "epoch": self.epoch + 1, "boxes": "gt"}
                    best_path = save_checkpoint(self.work_dir / "best.pt", self.eval_module(), self.meta(metrics))
                    if self.publisher is not None:
                        self.publisher.publish(best_path, self.best, self.global_iter, self.work_dir)
            if self.distributed:
                dist.barrier()
        if self.is_main and cfg.checkpoint_every and (self.epoch + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(self.work_dir / f"epoch_{self.epoch + 1}.pt", self.eval_module(), self.meta())

    def _epoch_stats(self, seen: list[list[int]], steps: int, seconds: float, wait: float) -> dict[str, Any]:
        """images/s, loader wait (the slowest process's) and a digest of the global batches this epoch."""
        lay = self.layout
        if self.distributed:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, seen)
            waits = torch.tensor([wait], dtype=torch.float64, device=self.device)
            dist.all_reduce(waits, op=dist.ReduceOp.MAX)
            wait = float(waits)
        else:
            gathered = [seen]
        per_step = [sorted(i for rank_seen in gathered for mb in rank_seen[s * lay.accumulation:
                                                                           (s + 1) * lay.accumulation] for i in mb)
                    for s in range(steps)]
        images = sum(len(b) for b in per_step)
        return {
            "kind": "epoch", "epoch": self.epoch + 1, "iter": self.global_iter, "steps": steps, "images": images,
            "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 2) if seconds > 0 else None,
            "loader_wait_s": round(wait, 3), "loader_wait_frac": round(wait / seconds, 4) if seconds > 0 else None,
            "batches_sha1": hashlib.sha1(json.dumps(per_step).encode()).hexdigest(),
        }

    def _write_plots(self) -> None:
        """Loss and AP/PCKh curves as PNG next to the logs; a plotting failure never fails training."""
        try:
            from ditepose.training.plots import plot_training_curves

            plot_training_curves(self.work_dir, self.work_dir / "plots")
        except Exception as exc:  # matplotlib missing or an empty log: the checkpoints matter more
            log.warning("training plots not written: %s", exc)

    def fit(self) -> dict[str, Any]:
        """Run until ``cfg.epochs`` (or ``cfg.max_iters``); returns a summary dict."""
        cfg = self.cfg
        start = time.time()
        stopped_early = False
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            tqdm = None
        while self.epoch < cfg.epochs and not stopped_early:
            if cfg.max_iters is not None and self.global_iter >= cfg.max_iters:
                break
            self.ddp.train()
            epoch_start = time.perf_counter()
            wait = 0.0
            seen: list[list[int]] = []
            steps = 0
            it = iter(self._loader())
            bar = tqdm(total=self.steps_per_epoch - self.iter_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                       leave=False, disable=not self.progress) if tqdm else None
            while self.iter_in_epoch < self.steps_per_epoch:
                micro = []
                for _ in range(self.layout.accumulation):
                    t0 = time.perf_counter()
                    batch = next(it)
                    wait += time.perf_counter() - t0
                    seen.append(batch["index"].tolist())
                    micro.append(batch)
                loss = self._step(micro)
                self.iter_in_epoch += 1
                self.global_iter += 1
                steps += 1
                logged = self.global_iter % cfg.log_every == 0 or self.global_iter == 1
                if logged:
                    mean_loss = self._global_mean(loss)
                    self.logger.log({"kind": "train", "epoch": self.epoch + 1, "iter": self.global_iter,
                                     "loss": mean_loss, "lr": lr_at(cfg, self.epoch, self.global_iter - 1),
                                     "seconds": round(time.time() - start, 3)})
                if bar:
                    bar.update(1)
                    if logged:
                        bar.set_postfix(loss=f"{mean_loss:.3e}")
                if cfg.max_iters is not None and self.global_iter >= cfg.max_iters:
                    stopped_early = True
                    break
            del it
            if bar:
                bar.close()
            stats = self._epoch_stats(seen, steps, time.perf_counter() - epoch_start, wait)
            stats["complete"] = self.iter_in_epoch >= self.steps_per_epoch
            if self.is_main:
                self.logger.log(stats)
                self.throughput.append(stats)
                _say(f"epoch {stats['epoch']}/{cfg.epochs}: {steps} steps, {stats['images']} images in "
                     f"{stats['seconds']:.1f} s = {stats['images_per_s']} img/s; data-loader wait "
                     f"{stats['loader_wait_s']:.1f} s ({100 * (stats['loader_wait_frac'] or 0):.0f}%)")
            if stats["complete"]:
                self._after_epoch()
                self.epoch += 1
                self.iter_in_epoch = 0
            self.save_state()
            if self.is_main:
                save_checkpoint(self.work_dir / "latest.pt", self.eval_module(), self.meta())
        finished = self.epoch >= cfg.epochs
        test = self.test() if self.is_main and finished and cfg.eval_every else {}
        if test and self.is_main:
            self.logger.log({"kind": "test", "epoch": self.epoch, "iter": self.global_iter, "boxes": test["boxes"],
                             "box_source": test["box_source"], **test["metrics"]})
        summary = {"epochs_done": self.epoch, "iterations": self.global_iter, "best": self.best,
                   "last_metrics": self.last_metrics,
                   "validation": {"boxes": "gt", "epoch": self.last_eval_epoch, "metrics": self.last_metrics},
                   "test": test, "recipe": self.cfg.name, "reproduces": self.cfg.reproduces, "amp": self.cfg.amp,
                   "layout": asdict(self.layout), "differs_from_authors": differences(self.cfg),
                   "throughput": [{k: s[k] for k in ("epoch", "steps", "images", "seconds", "images_per_s",
                                                     "loader_wait_s", "loader_wait_frac")} for s in self.throughput],
                   "seconds": round(time.time() - start, 2), "work_dir": str(self.work_dir)}
        if self.publisher is not None:
            summary["publish"] = self.publisher.summary()
        if self.is_main:
            final_metrics = test.get("metrics", self.last_metrics) if test else self.last_metrics
            save_checkpoint(self.work_dir / "final.pt", self.eval_module(),
                            self.meta(final_metrics, test.get("box_source") if test else None))
            (self.work_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self._write_plots()
        self.logger.close()
        if self.distributed:
            dist.barrier()
        return summary


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
