"""The model repository: named models, numbered versions and a small manifest per model.

Layout (shared by the publisher, ``ditepose train --publish``, and the service's poller)::

    <repository>/
      <model-name>/             the name clients put in a request's ``model`` field
        manifest.json           optional; absent = serve the latest version with defaults
        1/checkpoint.pth        a version: a positive-integer folder with ONE .pth/.pt checkpoint
        1/version.json          optional sidecar (sha256 + size) written by publish_version
        .staging-<hex>/         ignored by every reader

A reader must never load a half-written checkpoint, so a version counts only when it is
*complete*: an integer name, exactly one checkpoint file, a sidecar (when present) whose size and
sha256 match, and a zip-format checkpoint whose end record is there. ``publish_version`` builds a
version in a dot-folder, fsyncs it and renames it into place, so pollers see all of it or nothing.

Pure Python on purpose (no service imports): the model package must not depend on the service;
the service maps :meth:`ModelManifest.to_model_options` onto its own settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ditepose.model.arguments import parse_size
from ditepose.model.codec import DECODER_NAMES
from ditepose.model.engines.precision import PRECISION_SETTINGS, PrecisionSetting, parse_precision_setting
from ditepose.model.engines.setting import ENGINE_SETTINGS, EngineSetting, parse_engine_setting
from ditepose.model.keypoints import COCO, MPII
from ditepose.model.registry import list_models

MANIFEST_NAME = "manifest.json"
SIDECAR_NAME = "version.json"
CHECKPOINT_SUFFIXES = (".pth", ".pt")
STAGING_PREFIX = ".staging-"
DATASETS = (COCO.name, MPII.name)

# A checkpoint source for publish_version: a file to copy, the bytes themselves, or a writer
# called with the destination path (e.g. ``lambda p: save_checkpoint(p, module, meta)``).
CheckpointSource = Path | str | bytes | Callable[[Path], object]


class ManifestError(ValueError):
    """A manifest (or a pin in it) that cannot be served; the message names the file and the key."""


@dataclass(frozen=True, kw_only=True)
class ServingOptions:
    """A model's own serving options, declared once for its manifest and for the model the pool serves
    (:class:`~ditepose.service.batching.loaded_model.LoadedModel`); ``None`` leaves one to the service."""

    flip_test: bool | None = None
    decoder: str | None = None
    max_batch_size: int | None = None
    precision: PrecisionSetting | None = None
    engine: EngineSetting | None = None

    def serving_options(self) -> dict[str, Any]:
        """The options that are set, by name (the ones left to the service are absent)."""
        options = {"flip_test": self.flip_test, "decoder": self.decoder, "max_batch_size": self.max_batch_size,
                   "precision": self.precision, "engine": self.engine}
        return {key: value for key, value in options.items() if value is not None}


@dataclass(frozen=True)
class ModelManifest(ServingOptions):
    """A model's manifest.json; every serving option is ``None`` when the file leaves it to the service."""

    version: Literal["latest"] | int = "latest"
    arch: str | None = None
    dataset: str | None = None
    input_size: tuple[int, int] | None = None  # (W, H); the file writes "HxW" like every CLI flag

    @property
    def pinned(self) -> bool:
        return self.version != "latest"

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest") -> ModelManifest:
        """Validate ``data`` (the parsed JSON); ``source`` names the file in every error."""
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: must be a JSON object, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, raw in data.items():
            if raw is None:
                continue  # an explicit null means the same as leaving the key out
            values[key] = _check_value(key, raw, source)
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelManifest:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ManifestError(f"{path}: no such file") from None
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def of_model_dir(cls, model_dir: str | Path) -> ModelManifest:
        """The model's manifest, or the defaults when it has none."""
        path = Path(model_dir) / MANIFEST_NAME
        if not path.exists():
            return cls()
        return cls.from_file(path)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (only keys that are set; ``input_size`` as "HxW")."""
        data: dict[str, Any] = {"version": self.version}
        for key, value in self.to_model_options().items():
            data[key] = f"{value[1]}x{value[0]}" if key == "input_size" else value
        return data

    def to_model_options(self) -> dict[str, Any]:
        """The serving options the manifest sets (``input_size`` as (W, H)), without ``version``.

        Keys a manifest leaves out are absent, so the service's own defaults (or a checkpoint's
        metadata) apply to them.
        """
        model = {"arch": self.arch, "dataset": self.dataset, "input_size": self.input_size}
        return {**{key: value for key, value in model.items() if value is not None}, **self.serving_options()}


def _check_value(key: str, raw: Any, source: str) -> Any:
    def bad(expected: str) -> ManifestError:
        return ManifestError(f"{source}: key {key!r} must be {expected}, got {raw!r}")

    if key == "version":
        if raw == "latest":
            return "latest"
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            raise bad('"latest" or a positive integer')
        return raw
    if key == "arch":
        if not isinstance(raw, str) or raw not in list_models():
            raise bad(f"one of {list_models()}")
        return raw
    if key == "dataset":
        if not isinstance(raw, str) or raw not in DATASETS:
            raise bad(f"one of {list(DATASETS)}")
        return raw
    if key == "input_size":
        if not isinstance(raw, str):
            raise bad('a string "HxW" such as "256x192"')
        try:
            width, height = parse_size(raw)
        except argparse.ArgumentTypeError:
            raise bad('a string "HxW" such as "256x192"') from None
        if width < 1 or height < 1:
            raise bad("positive sizes")
        return width, height
    if key == "flip_test":
        if not isinstance(raw, bool):
            raise bad("true or false")
        return raw
    if key == "decoder":
        if not isinstance(raw, str) or raw.lower() not in DECODER_NAMES:
            raise bad(f"one of {list(DECODER_NAMES)}")
        return raw.lower()
    if key == "max_batch_size":
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            raise bad("a positive integer")
        return raw
    if key == "precision":
        try:
            return parse_precision_setting(raw)
        except ValueError:
            raise bad(f"one of {list(PRECISION_SETTINGS)}") from None
    if key == "engine":
        try:
            return parse_engine_setting(raw)
        except ValueError:
            raise bad(f"one of {list(ENGINE_SETTINGS)}") from None
    raise ManifestError(f"{source}: unknown key {key!r}")  # from_dict filters these first


@dataclass(frozen=True)
class ResolvedVersion:
    """What to serve for one model: its manifest, the version and that version's checkpoint."""

    name: str
    model_dir: Path
    version: int
    checkpoint: Path
    manifest: ModelManifest
    pinned: bool
    sidecar: dict[str, Any] = field(default_factory=dict)  # version.json, {} when there is none


def write_manifest(model_dir: str | Path, manifest: ModelManifest) -> Path:
    """Write ``manifest.json`` atomically (temp file, fsync, rename): a poller never reads half of it."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / MANIFEST_NAME
    _write_atomic(path, (json.dumps(manifest.to_dict(), indent=2) + "\n").encode())
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _version_number(name: str) -> int | None:
    """A positive integer written plainly ('3', not '03', '+3' or ' 3'), else None."""
    if not name.isdigit() or not name.isascii() or name.startswith("0"):
        return None
    return int(name)


def _checkpoints_in(version_dir: Path) -> list[Path]:
    try:
        entries = list(version_dir.iterdir())
    except OSError:
        return []
    return [p for p in entries if p.suffix in CHECKPOINT_SUFFIXES and not p.name.startswith(".") and p.is_file()]


def _read_sidecar(version_dir: Path) -> dict[str, Any] | None:
    """The parsed version.json; {} when absent; None when present but unreadable (not complete)."""
    path = version_dir / SIDECAR_NAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _zip_is_whole(path: Path) -> bool:
    """torch's zip checkpoints end with a central directory; a truncated copy lacks it.

    Legacy (pre-zip pickle) checkpoints, which some authors' files are, carry no such marker, so
    they pass here and only a sidecar can vouch for them.
    """
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError:
        return False
    if magic != b"PK\x03\x04":
        return bool(magic)  # an empty file is never a checkpoint
    return zipfile.is_zipfile(path)


def _complete_checkpoint(version_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The version's checkpoint and sidecar if the folder is a complete version (cheap checks only)."""
    checkpoints = _checkpoints_in(version_dir)
    if len(checkpoints) != 1:
        return None
    checkpoint = checkpoints[0]
    sidecar = _read_sidecar(version_dir)
    if sidecar is None:
        return None
    if sidecar:
        if sidecar.get("checkpoint", checkpoint.name) != checkpoint.name:
            return None
        try:
            if int(sidecar["size"]) != checkpoint.stat().st_size:
                return None
        except (KeyError, TypeError, ValueError, OSError):
            return None
    if not _zip_is_whole(checkpoint):
        return None
    return checkpoint, sidecar


def list_versions(model_dir: str | Path) -> list[int]:
    """The complete versions of a model, ascending (see the module docstring for 'complete')."""
    model_dir = Path(model_dir)
    try:
        entries = list(model_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    versions = []
    for entry in entries:
        number = _version_number(entry.name)
        if number is not None and entry.is_dir() and _complete_checkpoint(entry) is not None:
            versions.append(number)
    return sorted(versions)


_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached by (path, size, mtime): a poller re-checks versions it already knows for free."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _hash_lock:
        if len(_hash_cache) > 4096:
            _hash_cache.clear()
        _hash_cache[key] = value
    return value


def _verified(version_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    found = _complete_checkpoint(version_dir)
    if found is None:
        return None
    checkpoint, sidecar = found
    if sidecar.get("sha256") is not None and file_sha256(checkpoint) != sidecar["sha256"]:
        return None
    return found


def resolve(model_dir: str | Path) -> ResolvedVersion | None:
    """The version to serve: the manifest's pin, else the highest complete version whose checksum holds.

    None when the model has no complete version. ManifestError for a bad manifest or a pin to a
    version that is missing or incomplete, so the caller keeps serving what it has and says why.
    """
    model_dir = Path(model_dir)
    manifest = ModelManifest.of_model_dir(model_dir)
    if manifest.pinned:
        version = int(manifest.version)
        found = _verified(model_dir / str(version))
        if found is None:
            available = list_versions(model_dir)
            raise ManifestError(
                f"{model_dir / MANIFEST_NAME}: key 'version' pins version {version}, which is missing or "
                f"incomplete in {model_dir}; complete versions: {available or 'none'}"
            )
        return ResolvedVersion(model_dir.name, model_dir, version, found[0], manifest, True, found[1])
    for version in reversed(list_versions(model_dir)):
        found = _verified(model_dir / str(version))
        if found is not None:
            return ResolvedVersion(model_dir.name, model_dir, version, found[0], manifest, False, found[1])
    return None


def scan(repository: str | Path) -> dict[str, Path]:
    """Model name -> model folder, sorted by name; dot-folders and plain files are skipped."""
    repository = Path(repository)
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository not found: {repository}")
    return {
        entry.name: entry
        for entry in sorted(repository.iterdir(), key=lambda p: p.name)
        if not entry.name.startswith(".") and entry.is_dir()
    }


def _fill_staging(staging: Path, checkpoint: CheckpointSource, metadata: Mapping[str, Any] | None) -> None:
    if isinstance(checkpoint, (str, Path)):
        source = Path(checkpoint)
        if not source.is_file():
            raise FileNotFoundError(f"checkpoint not found: {source}")
        suffix = source.suffix if source.suffix in CHECKPOINT_SUFFIXES else ".pth"
        target = staging / f"checkpoint{suffix}"
        shutil.copyfile(source, target)
    elif isinstance(checkpoint, bytes):
        target = staging / "checkpoint.pth"
        target.write_bytes(checkpoint)
    else:
        target = staging / "checkpoint.pth"
        checkpoint(target)
        if not target.is_file():
            raise ValueError(f"the checkpoint writer did not write {target}")
    leftovers = [p.name for p in staging.iterdir() if p != target]
    if leftovers:
        raise ValueError(f"the checkpoint writer left extra files in the staging folder: {leftovers}")
    with open(target, "rb+") as fh:
        os.fsync(fh.fileno())
    sidecar = {
        "checkpoint": target.name,
        "size": target.stat().st_size,
        "sha256": file_sha256(target),
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **dict(metadata or {}),
    }
    with open(staging / SIDECAR_NAME, "w", encoding="utf-8") as fh:
        json.dump(sidecar, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(staging)


def _highest_number(model_dir: Path) -> int:
    """The highest integer-named entry, complete or not: a new version never lands on an operator's folder."""
    numbers = [n for p in model_dir.iterdir() if (n := _version_number(p.name)) is not None]
    return max(numbers, default=0)


def publish_version(
    model_dir: str | Path, checkpoint: CheckpointSource, metadata: Mapping[str, Any] | None = None
) -> int:
    """Add ``checkpoint`` as the next version of the model in ``model_dir``; returns its number.

    The version is written in ``.staging-<hex>/`` with a ``version.json`` sidecar (sha256, size,
    ``metadata``), fsynced, then renamed to ``<N>`` (N = highest + 1). A rename onto a folder a
    concurrent publisher just created fails, and this one takes the next number. The staging
    folder is removed on any failure.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    reserved = {"checkpoint", "size", "sha256"} & set(metadata or {})
    if reserved:
        raise ValueError(f"metadata may not set {sorted(reserved)}: publish_version computes them")
    staging = model_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        _fill_staging(staging, checkpoint, metadata)
        number = _highest_number(model_dir) + 1
        while True:
            target = model_dir / str(number)
            if not target.exists():
                try:
                    # rename(2) replaces an EMPTY directory; a concurrent publisher's is never
                    # empty (it renames a full folder), so that case fails with ENOTEMPTY below.
                    os.rename(staging, target)
                    break
                except OSError:
                    if not target.exists():
                        raise
            number = max(number + 1, _highest_number(model_dir) + 1)
        _fsync_dir(model_dir)
        return number
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
