"""Names clients may use in an evaluation request: datasets and checkpoints.

A client never sends a path. Datasets come from the configured catalogue; checkpoints are
plain file names looked up inside ``checkpoint_dir`` (no separators, no ``..``, resolved path
must stay inside the folder).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from ditepose.service.core.settings import DatasetSpec, Settings

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CHECKPOINT_SUFFIXES = (".pth", ".pt")


DEMO_DATASET = "demo-synthetic"
DEMO_IMAGES = 8
DEMO_SEED = 2022


def ensure_demo_dataset(folder: Path) -> DatasetSpec:
    """The built-in evaluation set: deterministic synthetic figures, written once (atomically) on first use."""
    ann_file = folder / "annotations" / "person_keypoints_val.json"
    if not ann_file.is_file():
        import shutil
        import tempfile

        from ditepose.training.synth import synthesize

        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=folder.parent))
        synthesize("coco", staging, DEMO_IMAGES, seed=DEMO_SEED, split="val")
        try:
            staging.rename(folder)
        except OSError:  # another process won the race: its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    return DatasetSpec(format="coco", ann_file=ann_file, img_dir=folder / "val")


class UnknownName(LookupError):
    """The name is well formed but nothing is configured under it."""


class BadName(ValueError):
    """The name is not a plain catalogue name (path separators, ``..``, odd characters)."""


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise BadName(f"{kind} must be a plain name matching {NAME_RE.pattern} (no paths), got {name!r}")
    return name


@dataclass(frozen=True)
class Dataset:
    """A resolved catalogue entry."""

    name: str
    spec: DatasetSpec

    def to_payload(self) -> dict:
        return {"name": self.name, **self.spec.model_dump(mode="json")}


class Catalogue:
    """Datasets by name plus the checkpoint folder, both from :class:`Settings`."""

    def __init__(self, datasets: dict[str, DatasetSpec], checkpoint_dir: Path | None = None) -> None:
        for name in datasets:
            check_name("dataset name", name)
        self._datasets = dict(datasets)
        self.checkpoint_dir = checkpoint_dir.resolve() if checkpoint_dir is not None else None

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalogue:
        datasets = dict(settings.datasets)
        if settings.datasets_file is not None:
            path = settings.datasets_file
            if not path.is_file():
                raise FileNotFoundError(f"datasets_file not found: {path}")
            try:
                extra = TypeAdapter(dict[str, DatasetSpec]).validate_python(json.loads(path.read_text()))
            except (json.JSONDecodeError, ValidationError) as exc:
                raise ValueError(f"{path}: not a valid datasets catalogue: {exc}") from exc
            datasets.update(extra)
        if settings.demo_dataset and DEMO_DATASET not in datasets:
            datasets[DEMO_DATASET] = ensure_demo_dataset(settings.jobs_dir / "datasets" / DEMO_DATASET)
        return cls(datasets, settings.checkpoint_dir)

    def dataset_names(self) -> list[str]:
        return sorted(self._datasets)

    def dataset(self, name: str) -> Dataset:
        check_name("dataset", name)
        spec = self._datasets.get(name)
        if spec is None:
            known = ", ".join(self.dataset_names()) or "none configured"
            raise UnknownName(f"unknown dataset {name!r} (known: {known})")
        return Dataset(name, spec)

    def checkpoint_names(self) -> list[str]:
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return []
        return sorted(p.name for p in self.checkpoint_dir.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())

    def checkpoint(self, name: str) -> Path:
        """``name`` (with or without its suffix) inside ``checkpoint_dir``; never outside it."""
        check_name("checkpoint", name)
        if self.checkpoint_dir is None:
            raise UnknownName("no checkpoint_dir is configured; name a served model instead")
        candidates = [name] if name.endswith(CHECKPOINT_SUFFIXES) else [name + s for s in CHECKPOINT_SUFFIXES]
        for candidate in candidates:
            path = (self.checkpoint_dir / candidate).resolve()
            if path.parent != self.checkpoint_dir:  # a symlink pointing elsewhere
                continue
            if path.is_file():
                return path
        raise UnknownName(f"no checkpoint {name!r} in the checkpoint folder (known: {self.checkpoint_names()})")
