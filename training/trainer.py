"""The training loop: single process or torchrun DDP, a global batch, exact resume, evaluation.

Batches. Every optimizer step consumes one *global batch* of ``cfg.global_batch`` samples,
whatever the number of processes (:mod:`ditepose.training.schedule` deals them out).

Randomness is a pure function of the seed: model init from ``seed``, the sample order of epoch
``e`` from ``seed + e``, augmentation from ``(seed, epoch, index)``. So a run resumed from
``latest_state.pt`` (even mid-epoch) replays the same batches and gives the same loss curve as
an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ditepose.model import CheckpointMeta, build_model, save_checkpoint
from ditepose.model.pipeline import TopDownPipeline, module_infer
from ditepose.training.boxes import recipe_test_set
from ditepose.training.config import (
    AUTHORS_GPU_BATCH,
    AUTHORS_REPO,
    TrainConfig,
    describe_differences,
    differences,
)
from ditepose.training.data_layout import build_dataset
from ditepose.training.datasets import TopDownDataset
from ditepose.training.ema import EMA
from ditepose.training.evaluate import predict, primary_metric, score
from ditepose.training.logs import MetricsLogger, progress_bar
from ditepose.training.loss import JointsMSELoss
from ditepose.training.publish import BestPublisher, say
from ditepose.training.schedule import (
    BatchLayout,
    epoch_order,
    lr_at,
    micro_batches,
    step_samples,
    steps_per_epoch,
)

STATE_FILE = "latest_state.pt"
EVAL_BATCH = 32  # the authors' val/test samples_per_gpu (no effect on the numbers)


log = logging.getLogger(__name__)


class Trainer:
    """Train ``cfg`` on ``data_dir`` writing checkpoints and logs to ``work_dir``."""

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, work_dir: str | Path,
                 device: str | None = None, resume: str | Path | bool | None = None, progress: bool = True,
                 publish: str | Path | None = None) -> None:
        self.cfg = cfg
        self.data_dir, self.work_dir = Path(data_dir), Path(work_dir)
        self._join_processes(device)
        self.progress = progress and self.is_main
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._build_model()
        self._load_data(publish)
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

    def _join_processes(self, device: str | None) -> None:
        """This process's rank, batch layout and device; joins the torchrun process group if there is one."""
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed = self.world_size > 1
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.layout = BatchLayout.of(self.cfg, self.world_size)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and self.distributed:
            self.device = torch.device("cuda", local_rank)
        if self.cfg.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp 'fp16' needs CUDA (GradScaler); use 'bf16' or 'none' on CPU")
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _build_model(self) -> None:
        """The seeded model, its optimizer, loss scaler, EMA and loss (the same init on every process)."""
        cfg = self.cfg
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

    def _load_data(self, publish: str | Path | None) -> None:
        """The train split (which must fill a global batch), the val split if any, and --publish's publisher."""
        cfg = self.cfg
        self.train_set, _ = build_dataset(cfg, self.data_dir, "train", train=True)
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), cfg)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_set)} training samples in {self.data_dir} do not fill one global "
                             f"batch of {cfg.global_batch} (the last partial batch is dropped); lower global_batch")
        self.val_set: TopDownDataset | None = None
        self.val_gt: Path | None = None
        with contextlib.suppress(FileNotFoundError):
            self.val_set, self.val_gt = build_dataset(cfg, self.data_dir, "val", train=False)
        # --publish: each new best (by validation) becomes the next version of a repository model.
        self.publisher: BestPublisher | None = None
        if publish is not None:
            if self.val_set is None or not cfg.eval_every:
                why = f"no val split in {self.data_dir}" if self.val_set is None else "eval_every is 0"
                raise ValueError(f"--publish publishes new best checkpoints, which need validation: {why}")
            if self.is_main:
                self.publisher = BestPublisher(publish, cfg)

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
        say(f"recipe {self.cfg.name} (reproduces {info['reproduces'] or 'no authors config'}): "
             f"global batch {lay.global_batch} = {lay.world_size} process(es) x {lay.per_device} "
             f"x {lay.accumulation} accumulation; lr {self.cfg.base_lr:g}; {precision}; "
             f"{self.steps_per_epoch} steps/epoch on {len(self.train_set)} samples")
        diff = describe_differences(self.cfg)
        say("differs from the authors' config:\n" + diff if diff else "identical to the authors' config")
        for note in info["layout_notes"]:
            say(f"  note: {note}")
        (self.work_dir / "recipe.json").write_text(json.dumps({**info, "config": self.cfg.to_dict()}, indent=2))

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
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
                   "iterations": self.global_iter, "evaluated_on": self.evaluated_on() if metrics else None})

    def evaluated_on(self) -> str | None:
        """What the recorded metrics were scored on, in words (served as the model's quality)."""
        return None if self.val_set is None else f"{Path(self.data_dir).name} val split ({len(self.val_set)} people)"

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
            ddp = self.ddp
            sync = ddp.no_sync() if isinstance(ddp, nn.parallel.DistributedDataParallel) and not last \
                else contextlib.nullcontext()
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
        if self.val_set is None:
            return {}
        test_set, note = recipe_test_set(self.cfg, self.data_dir, str(self.device))
        if test_set is not None:
            return {**test_set.describe(), "metrics": self.evaluate(test_set.dataset)}
        result = {"note": note} if note else {}
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
        per_step = step_samples(gathered, lay, steps)
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
        while self.epoch < cfg.epochs and not stopped_early:
            if cfg.max_iters is not None and self.global_iter >= cfg.max_iters:
                break
            stats, stopped_early = self._train_epoch(start)
            if self.is_main:
                self.logger.log(stats)
                self.throughput.append(stats)
                say(f"epoch {stats['epoch']}/{cfg.epochs}: {stats['steps']} steps, {stats['images']} images in "
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
        summary = self._summary(start, test)
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

    def _train_epoch(self, start: float) -> tuple[dict[str, Any], bool]:
        """The rest of the current epoch (or up to ``max_iters``): (its stats, whether max_iters stopped it)."""
        cfg = self.cfg
        self.ddp.train()
        epoch_start = time.perf_counter()
        wait = 0.0
        seen: list[list[int]] = []
        steps = 0
        stopped_early = False
        it = iter(self._loader())
        bar = progress_bar(self.steps_per_epoch - self.iter_in_epoch, f"epoch {self.epoch + 1}/{cfg.epochs}",
                            self.progress)
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
        return stats, stopped_early

    def _summary(self, start: float, test: dict[str, Any]) -> dict[str, Any]:
        """What the run did (summary.json and :meth:`fit`'s return value)."""
        throughput_keys = ("epoch", "steps", "images", "seconds", "images_per_s", "loader_wait_s", "loader_wait_frac")
        summary = {"epochs_done": self.epoch, "iterations": self.global_iter, "best": self.best,
                   "last_metrics": self.last_metrics,
                   "validation": {"boxes": "gt", "epoch": self.last_eval_epoch, "metrics": self.last_metrics},
                   "test": test, "recipe": self.cfg.name, "reproduces": self.cfg.reproduces, "amp": self.cfg.amp,
                   "layout": asdict(self.layout), "differs_from_authors": differences(self.cfg),
                   "throughput": [{k: s[k] for k in throughput_keys} for s in self.throughput],
                   "seconds": round(time.time() - start, 2), "work_dir": str(self.work_dir)}
        if self.publisher is not None:
            summary["publish"] = self.publisher.summary()
        return summary


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
