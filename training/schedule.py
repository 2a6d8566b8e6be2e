"""The learning-rate schedule and the global-batch layout of a training run: pure functions of
the recipe, the epoch and the number of processes, so a resumed or re-sharded run replays the
same batches.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditepose.training.config import TrainConfig


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


def step_samples(seen_by_rank: list[list[list[int]]], layout: BatchLayout, steps: int) -> list[list[int]]:
    """The sorted sample indices of each of ``steps`` global batches, from every rank's micro-batches
    (``accumulation`` per step, in order): what an epoch's ``batches_sha1`` digests."""
    per_micro = layout.accumulation
    return [sorted(i for rank_seen in seen_by_rank for mb in rank_seen[s * per_micro:(s + 1) * per_micro] for i in mb)
            for s in range(steps)]
