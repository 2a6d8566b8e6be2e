"""The training loop: single process or torchrun DDP, exact resume, periodic evaluation.

Randomness is a pure function of the seed: model init from ``seed``, the sample order
of epoch ``e`` from ``seed + e``, augmentation from ``(seed, epoch, index)``. So a run
resumed from ``latest_state.pt`` (even mid-epoch) replays the same batches and gives
the same loss curve as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ditepose.model import CheckpointMeta, build_model, save_checkpoint
from ditepose.model.pipeline import module_infer
from ditepose.training.config import TrainConfig
from ditepose.training.data_layout import find_split
from ditepose.training.datasets import CocoKeypointDataset, MpiiKeypointDataset, TopDownDataset
from ditepose.training.evaluate import pipeline_for, predict, primary_metric, score
from ditepose.training.logs import MetricsLogger
from ditepose.training.loss import JointsMSELoss

STATE_FILE = "latest_state.pt"


log = logging.getLogger(__name__)


def lr_at(cfg: TrainConfig, epoch: int, global_iter: int) -> float:
    """mmcv 'step' policy with linear warm-up: base x gamma^(steps passed) x warm-up factor."""
    lr = cfg.lr * cfg.lr_gamma ** sum(1 for s in cfg.lr_steps if epoch >= s)
    if global_iter < cfg.warmup_iters:
        lr *= 1 - (1 - global_iter / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return lr


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


class Trainer:
    """Train ``cfg`` on ``data_dir`` writing checkpoints and logs to ``work_dir``."""

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, work_dir: str | Path,
                 device: str | None = None, resume: str | Path | bool | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.data_dir, self.work_dir = Path(data_dir), Path(work_dir)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed = self.world_size > 1
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and self.distributed:
            self.device = torch.device("cuda", local_rank)
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
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.criterion = JointsMSELoss(use_target_weight=True)

        self.train_set, _ = build_dataset(cfg, self.data_dir, "train", train=True)
        if len(self.train_set) == 0:
            raise ValueError(f"no training samples in {self.data_dir}")
        try:
            self.val_set, self.val_gt = build_dataset(cfg, self.data_dir, "val", train=False)
        except FileNotFoundError:
            self.val_set, self.val_gt = None, None
        self.epoch, self.iter_in_epoch, self.global_iter = 0, 0, 0
        self.best: dict[str, Any] = {"metric": None, "value": None, "epoch": None}
        self.last_metrics: dict[str, float] = {}
        if resume:
            self.load_state(self.work_dir / STATE_FILE if resume is True else Path(resume))
        self.ddp: nn.Module = self.model
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Dite-HRNet has parameters that never get a gradient (as in the official code: the DCM
            # mask conv of the branch that the module's output does not use), hence find_unused_parameters.
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)
        self.logger = MetricsLogger(self.work_dir, enabled=self.is_main)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "ema": self.ema.module.state_dict() if self.ema else None,
            "epoch": self.epoch, "iter_in_epoch": self.iter_in_epoch, "global_iter": self.global_iter,
            "best": json.dumps(self.best), "config": json.dumps(self.cfg.to_dict()),
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
        clash = [k for k in ("arch", "dataset", "input_size", "model_overrides", "batch_size", "seed")
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

    def meta(self, metrics: dict[str, float] | None = None) -> CheckpointMeta:
        return CheckpointMeta(
            arch=self.cfg.arch, dataset=self.cfg.dataset, num_joints=self.cfg.num_joints,
            input_size=self.cfg.input_size, overrides=dict(self.cfg.model_overrides),
            extra={"recipe": self.cfg.to_dict(), "metrics": metrics or {}, "epoch": self.epoch,
                   "iterations": self.global_iter})

    def eval_module(self) -> nn.Module:
        return self.ema.module if self.ema else self.model

    # ---------------------------------------------------------------- loop
    def _loader(self) -> DataLoader:
        self.train_set.set_epoch(self.epoch)
        if self.distributed:
            sampler = DistributedSampler(self.train_set, shuffle=True, seed=self.cfg.seed, drop_last=True)
            sampler.set_epoch(self.epoch)
            order = list(sampler)
        else:
            g = torch.Generator().manual_seed(self.cfg.seed + self.epoch)
            order = torch.randperm(len(self.train_set), generator=g).tolist()
        if len(order) % self.cfg.batch_size == 1 and len(order) > 1:
            order = order[:-1]  # a batch of one breaks BatchNorm on 1x1 attention maps
        self._batches_this_epoch = -(-len(order) // self.cfg.batch_size)
        order = order[self.iter_in_epoch * self.cfg.batch_size:]  # mid-epoch resume skips what was done
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size, sampler=order,
                          num_workers=self.cfg.workers, pin_memory=self.device.type == "cuda", drop_last=False)

    def _step(self, batch: dict[str, torch.Tensor]) -> float:
        lr = lr_at(self.cfg, self.epoch, self.global_iter)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = batch["input"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        weight = batch["target_weight"].to(self.device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else contextlib.nullcontext()
        with autocast:
            out = self.ddp(x)
        loss = self.criterion(out.float(), target, weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema:
            self.ema.update(self.model)
        return float(loss.detach())

    def evaluate(self) -> dict[str, float]:
        if self.val_set is None:
            return {}
        module = self.eval_module()
        was_training = module.training
        try:
            preds = predict(module_infer(module), self.val_set,
                            pipeline_for(self.val_set, self.cfg.flip_test, self.cfg.decoder), self.cfg.batch_size)
        finally:
            module.train(was_training)
        return score(self.val_set, preds, self.val_gt)

    def _after_epoch(self) -> None:
        cfg = self.cfg
        last = self.epoch + 1 == cfg.epochs
        if self.val_set is not None and cfg.eval_every and ((self.epoch + 1) % cfg.eval_every == 0 or last):
            metrics = self.evaluate() if self.is_main else {}
            if self.is_main:
                key = primary_metric(self.val_set)
                self.logger.log({"kind": "eval", "epoch": self.epoch + 1, "iter": self.global_iter, **metrics})
                self.last_metrics = metrics
                if self.best["value"] is None or metrics[key] > self.best["value"]:
                    self.best = {"metric": key, "value": metrics[key], "epoch": self.epoch + 1}
                    save_checkpoint(self.work_dir / "best.pt", self.eval_module(), self.meta(metrics))
            if self.distributed:
                dist.barrier()

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
            loader = self._loader()
            bar = tqdm(total=len(loader), desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not self.progress) if tqdm else None
            for batch in loader:
                loss = self._step(batch)
                self.iter_in_epoch += 1
                self.global_iter += 1
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3e}")
                if self.global_iter % cfg.log_every == 0 or self.global_iter == 1:
                    self.logger.log({"kind": "train", "epoch": self.epoch + 1, "iter": self.global_iter,
                                     "loss": loss, "lr": lr_at(cfg, self.epoch, self.global_iter - 1),
                                     "seconds": round(time.time() - start, 3)})
                if cfg.max_iters is not None and self.global_iter >= cfg.max_iters:
                    stopped_early = True
                    break
            if bar:
                bar.close()
            if self._epoch_done():
                self._after_epoch()
                self.epoch += 1
                self.iter_in_epoch = 0
            self.save_state()
            if self.is_main:
                save_checkpoint(self.work_dir / "latest.pt", self.eval_module(), self.meta())
        summary = {"epochs_done": self.epoch, "iterations": self.global_iter, "best": self.best,
                   "last_metrics": self.last_metrics,
                   "seconds": round(time.time() - start, 2), "work_dir": str(self.work_dir)}
        if self.is_main:
            save_checkpoint(self.work_dir / "final.pt", self.eval_module(), self.meta(self.last_metrics))
            (self.work_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self._write_plots()
        self.logger.close()
        if self.distributed:
            dist.barrier()
        return summary

    def _epoch_done(self) -> bool:
        return self.iter_in_epoch >= self._batches_this_epoch


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
