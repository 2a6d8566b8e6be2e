"""Every registered recipe is the authors' config, pinned field by field as data.

The values come from the six files ``configs/top_down/dite_hrnet/{coco,mpii}/ditehrnet_*.py`` of the
authors' repository (ZiyiZhang27/Dite-HRNet, mmpose 0.16 style); the comment beside each names the
line it reproduces. A field added to TrainConfig without a row here fails the test, and so does a
silent change such as 210 epochs.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from ditepose.model import get_config as model_config
from ditepose.training.augment import AugmentConfig, half_body
from ditepose.training.coco_eval import evaluate_coco
from ditepose.training.config import CONFIGS, TrainConfig, describe_differences, differences, get_config
from ditepose.training.schedule import BatchLayout, epoch_order, lr_at, micro_batches, steps_per_epoch

COCO_DETS = "person_detection_results/COCO_val2017_detections_AP_H_56_person.json"

# Settings the six configs share: field -> (value, the authors' config line).
COMMON: dict[str, tuple[object, str]] = {
    "lr": (2e-3, "optimizer = dict(type='Adam', lr=2e-3)"),
    "weight_decay": (0.0, "Adam without weight_decay"),
    "grad_clip": (None, "optimizer_config = dict(grad_clip=None)"),
    "warmup_iters": (500, "lr_config warmup='linear', warmup_iters=500"),
    "warmup_ratio": (0.001, "warmup_ratio=0.001"),
    "lr_steps": ((170, 200), "step=[170, 200] (MPII too)"),
    "lr_gamma": (0.1, "mmcv StepLrUpdaterHook's default gamma"),
    "global_batch": (256, "samples_per_gpu=32 on 8 GPUs (README: dist_train.sh ... 8)"),
    "per_device_batch": (None, "global_batch / processes: 32 on the authors' 8 GPUs"),
    "sampler_pad": (8, "mmpose DistributedSampler pads to a multiple of its 8 replicas"),
    "lr_batch": (256, "lr=2e-3 is for those 256 samples per step"),
    "scale_lr": (False, "tools/train.py --autoscale-lr not given"),
    "workers": (6, "workers_per_gpu=6"),
    "pin_memory": (True, "pin_memory=True"),
    "flip_test": (True, "test_cfg flip_test=True"),
    "shift_heatmap": (True, "test_cfg shift_heatmap=True"),
    "decoder": ("default", "test_cfg post_process='default'"),
    "modulate_kernel": (11, "test_cfg modulate_kernel=11"),
    "det_bbox_thr": (0.0, "data_cfg det_bbox_thr=0.0 (COCO; unused on MPII)"),
    "amp": ("none", "no fp16 = dict(...) in the config: fp32"),
    "ema_decay": (None, "no EMA hook"),
    "sync_bn": (False, "BatchNorm per GPU (norm_cfg BN, no SyncBN)"),
    "eval_every": (10, "evaluation = dict(interval=10, ...)"),
    "log_every": (50, "log_config interval=50"),
    "seed": (0, "no --seed: mmpose's sampler seed falls back to 0"),
    "max_iters": (None, "(project) no early stop"),
    "max_people": (None, "(project) the whole train set"),
    "model_overrides": ({}, "(project) the registered architecture, pinned below"),
    "augment.flip_prob": (0.5, "TopDownRandomFlip flip_prob=0.5"),
    "augment.scale_factor": (0.25, "TopDownGetRandomScaleRotation scale_factor=0.25"),
    "augment.rot_factor": (30.0, "rot_factor=30"),
    "augment.rot_prob": (0.6, "mmpose 0.16 TopDownGetRandomScaleRotation default rot_prob=0.6"),
    "augment.num_joints_half_body": (8, "TopDownHalfBodyTransform num_joints_half_body=8"),
}

# Per recipe: what differs between the six files.
RECIPE_COLUMNS = ("reproduces", "arch", "dataset", "input_size", "epochs", "augment.sigma", "augment.half_body_prob",
                  "test_boxes", "det_file", "checkpoint_every")
RECIPES: dict[str, tuple[object, ...]] = {
    # total_epochs = 270; TopDownGenerateTarget sigma=2 / 3; prob_half_body=0.3; use_gt_bbox=False + bbox_file;
    # checkpoint_config interval=10
    "dite_hrnet_18_coco_256x192": ("configs/top_down/dite_hrnet/coco/ditehrnet_18_coco_256x192.py", "dite_hrnet_18",
                                   "coco", (192, 256), 270, 2.0, 0.3, "detections", COCO_DETS, 10),
    "dite_hrnet_18_coco_384x288": ("configs/top_down/dite_hrnet/coco/ditehrnet_18_coco_384x288.py", "dite_hrnet_18",
                                   "coco", (288, 384), 270, 3.0, 0.3, "detections", COCO_DETS, 10),
    "dite_hrnet_30_coco_256x192": ("configs/top_down/dite_hrnet/coco/ditehrnet_30_coco_256x192.py", "dite_hrnet_30",
                                   "coco", (192, 256), 270, 2.0, 0.3, "detections", COCO_DETS, 10),
    "dite_hrnet_30_coco_384x288": ("configs/top_down/dite_hrnet/coco/ditehrnet_30_coco_384x288.py", "dite_hrnet_30",
                                   "coco", (288, 384), 270, 3.0, 0.3, "detections", COCO_DETS, 10),
    # total_epochs = 260; no TopDownHalfBodyTransform in the train pipeline; use_gt_bbox=True, bbox_file=None;
    # checkpoint_config interval=1
    "dite_hrnet_18_mpii_256x256": ("configs/top_down/dite_hrnet/mpii/ditehrnet_18_mpii_256x256.py", "dite_hrnet_18",
                                   "mpii", (256, 256), 260, 2.0, 0.0, "gt", None, 1),
    "dite_hrnet_30_mpii_256x256": ("configs/top_down/dite_hrnet/mpii/ditehrnet_30_mpii_256x256.py", "dite_hrnet_30",
                                   "mpii", (256, 256), 260, 2.0, 0.0, "gt", None, 1),
}

# backbone extra: stem_channels=32, num_modules, num_branches=(2, 3, 4), num_blocks=(2, 2, 2), num_channels
ARCH = {
    "dite_hrnet_18": {"stem_channels": 32, "num_modules": (2, 4, 2), "num_branches": (2, 3, 4),
                      "num_blocks": (2, 2, 2), "num_channels": ((40, 80), (40, 80, 160), (40, 80, 160, 320))},
    "dite_hrnet_30": {"stem_channels": 32, "num_modules": (3, 8, 3), "num_branches": (2, 3, 4),
                      "num_blocks": (2, 2, 2), "num_channels": ((40, 80), (40, 80, 160), (40, 80, 160, 320))},
}
NUM_JOINTS = {"coco": 17, "mpii": 16}  # channel_cfg num_output_channels


def _fields(cfg: TrainConfig) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, AugmentConfig):
            out.update({f"augment.{k}": v for k, v in dataclasses.asdict(value).items()})
        elif f.name != "name":
            out[f.name] = value
    return out


def test_the_table_covers_every_recipe_and_every_field() -> None:
    assert set(RECIPES) == set(CONFIGS)
    pinned = set(COMMON) | set(RECIPE_COLUMNS)
    assert set(_fields(CONFIGS["dite_hrnet_18_coco_256x192"])) == pinned, "pin the new field here"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_the_authors_config(name: str) -> None:
    cfg = get_config(name)
    expected = {k: v for k, (v, _) in COMMON.items()} | dict(zip(RECIPE_COLUMNS, RECIPES[name], strict=True))
    actual = _fields(cfg)
    wrong = {k: (actual[k], v) for k, v in expected.items() if actual[k] != v}
    assert not wrong, f"{name} departs from {cfg.reproduces}: (now, authors) {wrong}"
    assert cfg.num_joints == NUM_JOINTS[cfg.dataset] and cfg.base_lr == 2e-3
    arch = model_config(cfg.arch, cfg.num_joints)
    assert {k: getattr(arch, k) for k in ARCH[cfg.arch]} == ARCH[cfg.arch]
    assert differences(cfg) == {} and describe_differences(cfg) == ""


def test_coco_evaluation_constants_are_the_authors() -> None:
    # data_cfg vis_thr=0.2, oks_thr=0.9, soft_nms=False (plain OKS-NMS)
    params = inspect.signature(evaluate_coco).parameters
    assert (params["vis_thr"].default, params["oks_thr"].default, params["use_nms"].default) == (0.2, 0.9, True)


def test_differences_name_what_a_run_changes() -> None:
    cfg = get_config("dite_hrnet_18_coco_256x192", epochs=210, amp="bf16", workers=2)
    assert differences(cfg) == {
        "amp": {"authors": "none", "now": "bf16", "affects_weights": True},
        "epochs": {"authors": 270, "now": 210, "affects_weights": True},
        "workers": {"authors": 6, "now": 2, "affects_weights": False},
    }
    text = describe_differences(cfg)
    assert "epochs: authors 270 -> 210" in text and "workers: authors 6 -> 2 (bookkeeping only)" in text
    mpii = get_config("dite_hrnet_18_mpii_256x256").replace(augment=AugmentConfig(half_body_prob=0.3))
    assert differences(mpii) == {"augment.half_body_prob": {"authors": 0.0, "now": 0.3, "affects_weights": True}}
    assert "recipe" in differences(TrainConfig(name="mine"))


def test_lr_means_the_same_at_any_layout_and_scaling_is_opt_in() -> None:
    cfg = get_config("dite_hrnet_18_coco_256x192")
    assert lr_at(cfg, 0, 0) == pytest.approx(2e-6)
    assert lr_at(cfg, 0, 250) == pytest.approx(2e-3 * (1 - 0.5 * 0.999))
    assert lr_at(cfg, 5, 500) == pytest.approx(2e-3)
    assert lr_at(cfg, 170, 10**6) == pytest.approx(2e-4)
    assert lr_at(cfg, 200, 10**6) == pytest.approx(2e-5)
    small = cfg.replace(global_batch=64)
    assert small.base_lr == 2e-3 and lr_at(small, 5, 500) == pytest.approx(2e-3)
    assert small.replace(scale_lr=True).base_lr == pytest.approx(5e-4)


def test_mpii_pipeline_draws_no_half_body_randomness() -> None:
    cfg = get_config("dite_hrnet_18_mpii_256x256").augment
    s = {"visible": np.ones(16, np.float32), "joints": np.zeros((16, 2), np.float32),
         "center": np.zeros(2, np.float32), "scale": np.ones(2, np.float32)}
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    half_body(s, rng, cfg, upper_ids=list(range(6, 16)), aspect_ratio=1.0)
    assert rng.bit_generator.state == before


# ---------------------------------------------------------------- the global batch

def test_layouts_split_the_global_batch() -> None:
    cfg = get_config("dite_hrnet_18_coco_256x192")
    assert BatchLayout.of(cfg, 8) == BatchLayout(256, 8, 32, 1)
    assert BatchLayout.of(cfg, 1) == BatchLayout(256, 1, 256, 1)
    assert BatchLayout.of(cfg.replace(per_device_batch=32), 1) == BatchLayout(256, 1, 32, 8)
    assert BatchLayout.of(cfg.replace(per_device_batch=32), 2) == BatchLayout(256, 2, 32, 4)
    with pytest.raises(ValueError, match="not divisible"):
        BatchLayout.of(cfg, 3)
    with pytest.raises(ValueError, match="does not divide"):
        BatchLayout.of(cfg.replace(per_device_batch=64), 8)


def test_steps_per_epoch_are_the_authors_eight_gpu_epoch() -> None:
    cfg = get_config("dite_hrnet_18_coco_256x192")
    for n in (149813, 22246, 2000, 2047, 2045, 255):  # COCO train persons, MPII train, edge cases
        per_rank = -(-n // 8)  # DistributedSampler(num_replicas=8) pads
        assert steps_per_epoch(n, cfg) == per_rank // 32  # DataLoader(batch_size=32, drop_last=True)


def test_eight_processes_get_mmpose_distributed_sampler_batches() -> None:
    cfg = get_config("dite_hrnet_18_coco_256x192", seed=3)
    n, epoch = 2045, 5
    layout = BatchLayout.of(cfg, 8)
    order = epoch_order(n, cfg, epoch)
    for rank in range(8):
        sampler = DistributedSampler(range(n), num_replicas=8, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(epoch)
        reference = list(sampler)
        for step in range(steps_per_epoch(n, cfg)):
            assert micro_batches(order, layout, step, rank) == [reference[step * 32:(step + 1) * 32]]


def test_every_layout_sees_the_same_global_batches() -> None:
    cfg = get_config("dite_hrnet_18_coco_256x192", global_batch=16, per_device_batch=None)
    n = 75
    order = epoch_order(n, cfg, 2)
    assert len(order) == 80 and order[75:] == order[:5]  # padded by repetition, as torch's sampler
    layouts = [(1, None), (2, None), (4, None), (1, 8), (2, 4), (1, 2), (8, 2)]
    for step in range(steps_per_epoch(n, cfg)):
        want = sorted(order[step * 16:(step + 1) * 16])
        lanes_by_size: dict[int, list[list[int]]] = {}
        for world, per_device in layouts:
            layout = BatchLayout.of(cfg.replace(per_device_batch=per_device), world)
            lanes = [micro_batches(order, layout, step, r) for r in range(world)]
            got = sorted(i for rank_lanes in lanes for mb in rank_lanes for i in mb)
            assert got == want, (world, per_device)
            # lane v = micro-step m x world + rank: for one micro-batch size, the same lanes on any layout
            # (1 process x 2 micro-batches of 8 == 2 processes x 8; 2 x 2 x 4 == 4 x 4; 1 x 8 x 2 == 8 x 2)
            by_lane = [lanes[v % world][v // world] for v in range(layout.lanes)]
            assert lanes_by_size.setdefault(layout.per_device, by_lane) == by_lane, (world, per_device)
    assert torch.equal(torch.tensor(epoch_order(n, cfg, 2)), torch.tensor(order))  # a pure function


def test_the_training_guide_describes_these_recipes() -> None:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    section = guide[guide.index("## The recipes"):guide.index("\n## ", guide.index("## The recipes") + 1)]
    for phrase in ("270 epochs, ×0.1 at 170 and 200", "260 epochs, ×0.1 at 170 and 200", "global 256 per step",
                   "**no half-body**", "σ 3 at 384x288", "COCO_val2017_detections_AP_H_56_person.json", "fp32"):
        assert phrase in section, phrase
    assert "210" not in section
