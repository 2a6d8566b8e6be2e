"""Training recipes as frozen dataclasses: each registered one is an authors' config, field for field.

The six recipes reproduce ``configs/top_down/dite_hrnet/{coco,mpii}/ditehrnet_*`` of the
authors' repository (mmpose 0.16 style; ZiyiZhang27/Dite-HRNet). What those configs say, and
where this project takes a value from mmpose 0.16's defaults because the config is silent:

- Adam, lr 2e-3, no weight decay, no gradient clipping; ``step`` policy x0.1 at epochs 170 and
  200 with 500 linear warm-up iterations from ratio 0.001; COCO 270 epochs, MPII 260 (the MPII
  configs keep the same steps at 170 and 200).
- 32 samples per GPU on 8 GPUs (the README's ``dist_train.sh ... 8``) = a global batch of 256;
  mmpose's ``DistributedSampler`` pads each epoch's permutation to a multiple of the 8 processes
  and its loader drops the last partial batch (``drop_last=True``). 6 loader workers per GPU.
- Train pipeline: flip 0.5; half-body 0.3 for people with more than 8 visible joints (COCO only;
  the MPII pipeline has no half-body step); scale factor 0.25; rotation factor 30 with mmpose's
  default rotation probability 0.6; MSRA Gaussian targets, sigma 2 (3 at 384x288).
- Test: flip test with shifted heatmaps, ``post_process='default'`` (modulate kernel 11, used
  only by DARK); periodic validation every 10 epochs on ground-truth boxes (``val_data_cfg``
  ``use_gt_bbox=True``); the reported COCO numbers on the detections file
  ``COCO_val2017_detections_AP_H_56_person.json`` (``use_gt_bbox=False``, ``det_bbox_thr=0``).
- No fp16 setting: fp32. Checkpoints every 10 epochs (COCO) or every epoch (MPII); log every 50.
- The seed: the authors' ``tools/train.py`` leaves it unset unless ``--seed``; mmpose's sampler
  then uses 0, as here.

``differences(cfg)`` lists what a run changes from the recipe it reproduces; the trainer prints it
and records it in the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditepose.training.augment import AugmentConfig

DATASET_JOINTS = {"coco": 17, "mpii": 16}
AMP_MODES = ("none", "bf16", "fp16")
TEST_BOXES = ("gt", "detections", "detector")  # = ditepose.training.boxes.BOX_SOURCES
AUTHORS_REPO = "ZiyiZhang27/Dite-HRNet"
AUTHORS_GPUS = 8  # the authors' runs: 8 processes ...
AUTHORS_GPU_BATCH = 32  # ... of 32 samples each (so BatchNorm statistics over 32 samples)
COCO_DET_FILE = "person_detection_results/COCO_val2017_detections_AP_H_56_person.json"

# Fields that change what a run computes only through bookkeeping, never the weights it ends with.
BOOKKEEPING = frozenset({"name", "workers", "pin_memory", "log_every", "eval_every", "checkpoint_every"})


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe. ``input_size`` is (W, H); epochs are 0-based in the schedule.

    ``global_batch`` is the number of samples per optimizer step over all processes. With W
    processes each takes ``global_batch / W`` per step, in micro-batches of ``per_device_batch``
    (None: all at once) with gradient accumulation, so ``lr`` means the same on 1, 2 or 8 devices.
    """

    name: str
    reproduces: str = ""  # the authors' config file (path in their repository) this recipe is
    arch: str = "dite_hrnet_18"
    dataset: str = "coco"
    input_size: tuple[int, int] = (192, 256)
    epochs: int = 270
    global_batch: int = AUTHORS_GPUS * AUTHORS_GPU_BATCH
    per_device_batch: int | None = None  # None: global_batch / world size (no accumulation)
    sampler_pad: int = AUTHORS_GPUS  # each epoch's permutation is padded to a multiple of this
    lr: float = 2e-3
    lr_batch: int = AUTHORS_GPUS * AUTHORS_GPU_BATCH  # the global batch ``lr`` is quoted for
    scale_lr: bool = False  # linear scaling rule: lr x global_batch / lr_batch (opt-in)
    weight_decay: float = 0.0
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    lr_steps: tuple[int, ...] = (170, 200)
    lr_gamma: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    flip_test: bool = True
    shift_heatmap: bool = True
    decoder: str = "default"  # mmpose post_process
    modulate_kernel: int = 11  # DARK's Gaussian modulation (unused by 'default')
    # end-of-training evaluation: 'detections' (COCO paper protocol: det_file), 'gt', or 'detector'
    # (the live default detector, NanoDet at its threshold; training/boxes.py)
    test_boxes: str = "detections"
    det_file: str | None = COCO_DET_FILE  # relative to the data folder, or absolute
    det_bbox_thr: float = 0.0
    workers: int = 6  # per process
    pin_memory: bool = True
    seed: int = 0
    amp: str = "none"  # 'none' (fp32, the authors'), 'bf16' or 'fp16' autocast
    grad_clip: float | None = None
    ema_decay: float | None = None
    sync_bn: bool = False
    eval_every: int = 10  # epochs; 0 disables periodic evaluation (ground-truth boxes)
    checkpoint_every: int = 10  # epochs: epoch_N.pt snapshots; 0 disables
    log_every: int = 50  # iterations
    max_iters: int | None = None  # stop (and save a resumable state) after this many optimizer steps in all
    max_people: int | None = None  # use only the first N training samples (smoke runs)
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dataset not in DATASET_JOINTS:
            raise ValueError(f"dataset must be one of {sorted(DATASET_JOINTS)}, got {self.dataset!r}")
        w, h = self.input_size
        if w % 32 or h % 32:
            raise ValueError(f"input size {w}x{h} must be divisible by 32")
        if self.epochs < 1 or self.global_batch < 1 or self.lr <= 0 or self.lr_batch < 1 or self.sampler_pad < 1:
            raise ValueError("epochs, global_batch, lr_batch and sampler_pad must be >= 1 and lr > 0")
        if self.per_device_batch is not None and (self.per_device_batch < 1
                                                  or self.global_batch % self.per_device_batch):
            raise ValueError(f"per_device_batch {self.per_device_batch} must divide global_batch {self.global_batch}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.test_boxes not in TEST_BOXES:
            raise ValueError(f"test_boxes must be one of {TEST_BOXES}, got {self.test_boxes!r}")
        if self.dataset == "mpii" and self.test_boxes != "gt":
            raise ValueError("MPII is evaluated on its annotated person centres and scales: test_boxes must be 'gt'")

    @property
    def num_joints(self) -> int:
        return DATASET_JOINTS[self.dataset]

    @property
    def base_lr(self) -> float:
        """The peak learning rate: ``lr``, linearly scaled to ``global_batch`` only when ``scale_lr``."""
        return self.lr * self.global_batch / self.lr_batch if self.scale_lr else self.lr

    def replace(self, **overrides: Any) -> TrainConfig:
        """A copy with fields replaced; unknown names are a clear error."""
        if "batch_size" in overrides:
            raise KeyError("batch_size (per process) is gone: set global_batch (all processes, per optimizer step) "
                           "and, to accumulate gradients, per_device_batch")
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise KeyError(f"unknown TrainConfig field(s) {sorted(unknown)}")
        if isinstance(overrides.get("augment"), dict):
            overrides["augment"] = AugmentConfig(**overrides["augment"])
        for key in ("input_size", "lr_steps"):
            if isinstance(overrides.get(key), list):
                overrides[key] = tuple(overrides[key])
        if isinstance(overrides.get("amp"), bool):  # recipes written before amp took a mode
            overrides["amp"] = "fp16" if overrides["amp"] else "none"
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(name=str(data["name"])).replace(**{k: v for k, v in data.items() if k != "name"})


def _authors_config(arch: str, dataset: str, w: int, h: int) -> str:
    return f"configs/top_down/dite_hrnet/{dataset}/ditehrnet_{arch.rsplit('_', 1)[1]}_{dataset}_{h}x{w}.py"


def _variants() -> dict[str, TrainConfig]:
    out = {}
    for arch in ("dite_hrnet_18", "dite_hrnet_30"):
        for w, h in ((192, 256), (288, 384)):
            name = f"{arch}_coco_{h}x{w}"
            out[name] = TrainConfig(
                name=name, reproduces=_authors_config(arch, "coco", w, h), arch=arch, dataset="coco",
                input_size=(w, h), epochs=270, augment=AugmentConfig(sigma=2.0 if h == 256 else 3.0),
                test_boxes="detections", det_file=COCO_DET_FILE, checkpoint_every=10)
        name = f"{arch}_mpii_256x256"
        out[name] = TrainConfig(
            name=name, reproduces=_authors_config(arch, "mpii", 256, 256), arch=arch, dataset="mpii",
            input_size=(256, 256), epochs=260, augment=AugmentConfig(half_body_prob=0.0, sigma=2.0),
            test_boxes="gt", det_file=None, checkpoint_every=1)
    return out


CONFIGS: dict[str, TrainConfig] = _variants()


def list_configs() -> list[str]:
    return sorted(CONFIGS)


def get_config(name_or_path: str | Path, **overrides: Any) -> TrainConfig:
    """A registered recipe (e.g. 'dite_hrnet_18_coco_256x192') or a JSON file of fields, with overrides."""
    key = str(name_or_path)
    if key in CONFIGS:
        cfg = CONFIGS[key]
    elif key.endswith(".json") and Path(key).is_file():
        cfg = TrainConfig.from_dict(json.loads(Path(key).read_text()))
    else:
        raise KeyError(f"unknown training config {key!r}; registered: {list_configs()} (or a .json file)")
    return cfg.replace(**{k: v for k, v in overrides.items() if v is not None})


def reference_for(cfg: TrainConfig) -> TrainConfig | None:
    """The registered recipe ``cfg`` derives from: same name, else the one reproducing the same config."""
    if cfg.name in CONFIGS:
        return CONFIGS[cfg.name]
    return next((c for c in CONFIGS.values() if cfg.reproduces and c.reproduces == cfg.reproduces), None)


def _flat(cfg: TrainConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in json.loads(json.dumps(cfg.to_dict())).items():
        if isinstance(value, dict) and key == "augment":
            out.update({f"augment.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def differences(cfg: TrainConfig, reference: TrainConfig | None = None) -> dict[str, dict[str, Any]]:
    """Fields where ``cfg`` departs from the authors' recipe: ``{field: {"authors": a, "now": b}}``.

    ``reference`` defaults to :func:`reference_for`; a config with no registered counterpart
    reports ``{"recipe": ...}``. Bookkeeping fields (workers, logging, evaluation and checkpoint
    intervals) are listed too, marked ``"affects_weights": False``.
    """
    ref = reference if reference is not None else reference_for(cfg)
    if ref is None:
        return {"recipe": {"authors": None, "now": cfg.name, "affects_weights": True}}
    a, b = _flat(ref), _flat(cfg)
    return {k: {"authors": a.get(k), "now": b.get(k), "affects_weights": k not in BOOKKEEPING}
            for k in sorted(set(a) | set(b)) if k != "name" and a.get(k) != b.get(k)}


def describe_differences(cfg: TrainConfig) -> str:
    """One line per difference (empty when the run is the authors' recipe)."""
    diffs = differences(cfg)
    lines = []
    for key, d in diffs.items():
        note = "" if d["affects_weights"] else " (bookkeeping only)"
        lines.append(f"  {key}: authors {d['authors']!r} -> {d['now']!r}{note}")
    return "\n".join(lines)
