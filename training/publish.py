"""Publishing a training run's best checkpoints as versions of a model repository's model
(``ditepose train --publish``), so the service can serve each new best as it appears."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ditepose.model.repository import MANIFEST_NAME, ModelManifest, publish_version, write_manifest
from ditepose.training.config import TrainConfig


def say(text: str) -> None:
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
                say(f"note: {self.manifest_path} pins version {theirs.version}; published versions are not "
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
            say(f"!!! publishing the new best checkpoint to {self.model_dir} failed ({message}); "
                 f"it stays at {checkpoint}")
            return None
        self.published.append({"version": version, **{k: metadata[k] for k in ("metric", "value", "epoch")}})
        say(f"published best checkpoint ({metadata['metric']} {metadata['value']:.4f}, epoch {metadata['epoch']}) "
             f"as {self.model_dir / str(version)}")
        return version

    def summary(self) -> dict[str, Any]:
        return {"model_dir": str(self.model_dir), "versions": self.published, "errors": self.errors}
