"""Where a dataset split's files live under ``--data DIR`` (real COCO/MPII or ``ditepose synth``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ditepose.training.config import TrainConfig
from ditepose.training.datasets import CocoKeypointDataset, MpiiKeypointDataset, TopDownDataset


@dataclass(frozen=True)
class SplitFiles:
    ann_file: Path
    img_dir: Path
    gt_file: Path | None = None  # MPII PCKh ground truth


def _first(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


def find_split(data_dir: str | Path, dataset: str, split: str) -> SplitFiles:
    """COCO: annotations/person_keypoints_{split}[2017].json + {split}[2017]/ (or images/).
    MPII: annotations/mpii_{split}.json + images/ + annotations/mpii_gt_{split}.{mat,json,npz}."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    ann_dir = root / "annotations"
    if dataset == "coco":
        ann = _first([ann_dir / f"person_keypoints_{split}2017.json", ann_dir / f"person_keypoints_{split}.json"])
        img = _first([root / f"{split}2017", root / split, root / "images"])
        gt = None
    elif dataset == "mpii":
        ann = _first([ann_dir / f"mpii_{split}.json"])
        img = _first([root / "images"])
        gt = _first([ann_dir / f"mpii_gt_{split}.{ext}" for ext in ("mat", "json", "npz")])  # the official .mat first
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    if ann is None or img is None:
        raise FileNotFoundError(f"no {dataset} '{split}' split under {root} (annotations/ + images)")
    return SplitFiles(ann, img, gt)


def build_dataset(cfg: TrainConfig, data_dir: Path, split: str, train: bool) -> tuple[TopDownDataset, Path | None]:
    """The recipe's dataset split under ``data_dir`` (training augmentation when ``train``) and,
    for MPII, its PCKh ground-truth file."""
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
