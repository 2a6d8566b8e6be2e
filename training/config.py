"""Training recipes as frozen dataclasses; the defaults are the paper's (mmpose 0.16 configs)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditepose.training.augment import AugmentConfig

DATASET_JOINTS = {"coco": 17, "mpii": 16}


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe. ``input_size`` is (W, H); epochs are 0-based in the schedule."""

    name: str
    arch: str = "dite_hrnet_18"
    dataset: str = "coco"
    input_size: tuple[int, int] = (192, 256)
    epochs: int = 210
    batch_size: int = 32  # per process (per GPU)
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    lr_steps: tuple[int, ...] = (170, 200)
    lr_gamma: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    flip_test: bool = True
    decoder: str = "default"
    workers: int = 2
    seed: int = 0
    amp: bool = True  # only takes effect on CUDA
    grad_clip: float | None = None
    ema_decay: float | None = None
    sync_bn: bool = False
    eval_every: int = 10  # epochs; 0 disables periodic evaluation
    log_every: int = 20  # iterations
    max_iters: int | None = None  # stop (and save a resumable state) after this many iterations in all
    max_people: int | None = None  # use only the first N training samples (smoke runs)
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dataset not in DATASET_JOINTS:
            raise ValueError(f"dataset must be one of {sorted(DATASET_JOINTS)}, got {self.dataset!r}")
        w, h = self.input_size
        if w % 32 or h % 32:
            raise ValueError(f"input size {w}x{h} must be divisible by 32")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")

    @property
    def num_joints(self) -> int:
        return DATASET_JOINTS[self.dataset]

    def replace(self, **overrides: Any) -> TrainConfig:
        """A copy with fields replaced; unknown names are a clear error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise KeyError(f"unknown TrainConfig field(s) {sorted(unknown)}")
        if isinstance(overrides.get("augment"), dict):
            overrides["augment"] = AugmentConfig(**overrides["augment"])
        for key in ("input_size", "lr_steps"):
            if isinstance(overrides.get(key), list):
                overrides[key] = tuple(overrides[key])
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(name=str(data["name"])).replace(**{k: v for k, v in data.items() if k != "name"})


def _variants() -> dict[str, TrainConfig]:
    out = {}
    for arch in ("dite_hrnet_18", "dite_hrnet_30"):
        for w, h in ((192, 256), (288, 384)):
            name = f"{arch}_coco_{h}x{w}"
            out[name] = TrainConfig(name=name, arch=arch, dataset="coco", input_size=(w, h))
        name = f"{arch}_mpii_256x256"
        out[name] = TrainConfig(name=name, arch=arch, dataset="mpii", input_size=(256, 256))
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
