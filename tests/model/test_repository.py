"""The model repository format: manifests, complete versions, resolve, scan and the atomic publish."""

from __future__ import annotations

import io
import json
import multiprocessing
import threading
from pathlib import Path

import pytest
import torch

from ditepose.model.repository import (
    MANIFEST_NAME,
    SIDECAR_NAME,
    ManifestError,
    ModelManifest,
    list_versions,
    publish_version,
    resolve,
    scan,
    write_manifest,
)


def checkpoint_bytes(marker: float = 0.0) -> bytes:
    """A real (zip-format) torch checkpoint, small: the repository never loads weights itself."""
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.full((4,), marker)}}, buffer)
    return buffer.getvalue()


def write_version(model_dir: Path, number: int | str, data: bytes | None = None, name: str = "checkpoint.pth") -> Path:
    folder = model_dir / str(number)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(checkpoint_bytes(float(number) if str(number).isdigit() else 0.0) if data is None else data)
    return path


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


# -- manifest ---------------------------------------------------------------------------------------


def test_manifest_reads_every_key(tmp_path: Path) -> None:
    path = write_json(tmp_path / MANIFEST_NAME, {
        "version": 3, "arch": "dite_hrnet_30", "dataset": "mpii", "input_size": "256x192",
        "flip_test": False, "decoder": "dark", "max_batch_size": 16, "precision": "bf16",
    })
    manifest = ModelManifest.from_file(path)
    assert manifest == ModelManifest(version=3, arch="dite_hrnet_30", dataset="mpii", input_size=(192, 256),
                                     flip_test=False, decoder="dark", max_batch_size=16, precision="bf16")
    assert manifest.pinned
    assert manifest.to_model_options() == {
        "arch": "dite_hrnet_30", "dataset": "mpii", "input_size": (192, 256), "flip_test": False,
        "decoder": "dark", "max_batch_size": 16, "precision": "bf16",
    }


def test_manifest_defaults_leave_options_to_the_service(tmp_path: Path) -> None:
    manifest = ModelManifest.from_file(write_json(tmp_path / MANIFEST_NAME, {}))
    assert manifest == ModelManifest()
    assert manifest.version == "latest" and not manifest.pinned
    assert manifest.to_model_options() == {}
    assert ModelManifest.of_model_dir(tmp_path / "nowhere") == ModelManifest()
    # null is the same as leaving a key out
    assert ModelManifest.from_dict({"decoder": None, "version": "latest"}) == ModelManifest()


def test_manifest_round_trips_through_write_manifest(tmp_path: Path) -> None:
    manifest = ModelManifest(version=2, input_size=(288, 384), decoder="argmax", precision="fp16")
    path = write_manifest(tmp_path / "pose", manifest)
    assert json.loads(path.read_text())["input_size"] == "384x288"
    assert ModelManifest.from_file(path) == manifest
    assert [p.name for p in path.parent.iterdir()] == [MANIFEST_NAME]  # no temp file left behind


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"versoin": 2}, "versoin"),
        ({"version": 0}, "version"),
        ({"version": "2"}, "version"),
        ({"version": True}, "version"),
        ({"arch": "resnet50"}, "arch"),
        ({"dataset": "crowdpose"}, "dataset"),
        ({"input_size": "256"}, "input_size"),
        ({"input_size": "0x192"}, "input_size"),
        ({"input_size": [256, 192]}, "input_size"),
        ({"flip_test": "yes"}, "flip_test"),
        ({"decoder": "soft-argmax"}, "decoder"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 8.5}, "max_batch_size"),
        ({"precision": "int8"}, "precision"),
    ],
)
def test_manifest_errors_name_the_file_and_the_key(tmp_path: Path, data: dict, key: str) -> None:
    path = write_json(tmp_path / MANIFEST_NAME, data)
    with pytest.raises(ManifestError) as caught:
        ModelManifest.from_file(path)
    assert str(path) in str(caught.value)
    assert repr(key) in str(caught.value) or f"['{key}']" in str(caught.value)


def test_manifest_that_is_not_an_object_or_not_json(tmp_path: Path) -> None:
    path = tmp_path / MANIFEST_NAME
    path.write_text("[1, 2]")
    with pytest.raises(ManifestError, match="JSON object"):
        ModelManifest.from_file(path)
    path.write_text('{"version": ')
    with pytest.raises(ManifestError, match="not valid JSON"):
        ModelManifest.from_file(path)


def test_manifest_accepts_every_project_decoder_name() -> None:
    from ditepose.model.codec import DECODER_NAMES

    for name in DECODER_NAMES:
        assert ModelManifest.from_dict({"decoder": name.upper()}).decoder == name


# -- versions ---------------------------------------------------------------------------------------


def test_list_versions_keeps_only_complete_integer_folders(tmp_path: Path) -> None:
    model = tmp_path / "pose"
    write_version(model, 1)
    write_version(model, 10, name="weights.pt")
    write_version(model, 2)
    write_version(model, "03")  # not a plain positive integer
    write_version(model, "latest")
    write_version(model, ".staging-abc")
    (model / "4").mkdir()  # no checkpoint
    write_version(model, 5)
    write_version(model, 5, name="other.pth")  # two checkpoints: ambiguous
    (model / "6").write_text("a file, not a folder")
    write_version(model, 7, data=checkpoint_bytes()[:200])  # half-copied zip checkpoint
    write_version(model, 8, data=b"")  # empty file
    write_version(model, 9)
    write_json(model / "9" / SIDECAR_NAME, {"checkpoint": "checkpoint.pth", "size": 1, "sha256": "0" * 64})
    write_version(model, 11)
    (model / "11" / SIDECAR_NAME).write_text("{broken")
    assert list_versions(model) == [1, 2, 10]
    assert list_versions(tmp_path / "missing") == []


def test_resolve_serves_the_latest_complete_version(tmp_path: Path) -> None:
    model = tmp_path / "pose"
    assert resolve(model) is None
    (model / "1").mkdir(parents=True)
    assert resolve(model) is None
    write_version(model, 1)
    write_version(model, 2)
    write_version(model, 3, data=checkpoint_bytes()[:100])
    resolved = resolve(model)
    assert resolved is not None
    assert (resolved.name, resolved.version, resolved.pinned) == ("pose", 2, False)
    assert resolved.checkpoint == model / "2" / "checkpoint.pth"
    assert resolved.manifest == ModelManifest()


def test_resolve_follows_a_pin_and_rejects_a_pin_to_a_missing_version(tmp_path: Path) -> None:
    model = tmp_path / "pose"
    write_version(model, 1)
    write_version(model, 2)
    write_manifest(model, ModelManifest(version=1, flip_test=False))
    resolved = resolve(model)
    assert resolved is not None and (resolved.version, resolved.pinned) == (1, True)
    assert resolved.manifest.flip_test is False
    write_manifest(model, ModelManifest(version=5))
    with pytest.raises(ManifestError, match=r"pins version 5.*complete versions: \[1, 2\]"):
        resolve(model)
    write_manifest(model, ModelManifest())  # unpinning is an edit of the manifest
    resolved = resolve(model)
    assert resolved is not None and resolved.version == 2


def test_resolve_skips_a_version_whose_checksum_does_not_match(tmp_path: Path) -> None:
    model = tmp_path / "pose"
    publish_version(model, checkpoint_bytes(1.0))
    publish_version(model, checkpoint_bytes(2.0))
    checkpoint = model / "2" / "checkpoint.pth"
    other = checkpoint_bytes(3.0)
    assert len(other) == checkpoint.stat().st_size  # same size, a whole zip: only the sha256 tells
    checkpoint.write_bytes(other)
    assert list_versions(model) == [1, 2]
    resolved = resolve(model)
    assert resolved is not None and resolved.version == 1
    write_manifest(model, ModelManifest(version=2))
    with pytest.raises(ManifestError, match="pins version 2"):
        resolve(model)


def test_resolve_reports_a_bad_manifest(tmp_path: Path) -> None:
    model = tmp_path / "pose"
    write_version(model, 1)
    write_json(model / MANIFEST_NAME, {"precision": "fp8"})
    with pytest.raises(ManifestError, match="precision"):
        resolve(model)


def test_scan_lists_model_folders_only(tmp_path: Path) -> None:
    for name in ("person", "coco-large", ".trash", ".staging-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "README.txt").write_text("not a model")
    assert scan(tmp_path) == {"coco-large": tmp_path / "coco-large", "person": tmp_path / "person"}
    with pytest.raises(FileNotFoundError, match="model repository not found"):
        scan(tmp_path / "missing")


# -- publish ----------------------------------------------------------------------------------------


def test_publish_numbers_versions_and_writes_a_sidecar(tmp_path: Path) -> None:
    model = tmp_path / "repo" / "pose"
    source = tmp_path / "best.pt"
    source.write_bytes(checkpoint_bytes(1.0))
    assert publish_version(model, source, metadata={"metric": "AP", "value": 0.5}) == 1
    assert publish_version(model, checkpoint_bytes(2.0)) == 2
    assert publish_version(model, lambda path: torch.save({"state_dict": {}}, path)) == 3
    assert list_versions(model) == [1, 2, 3]
    assert sorted(p.name for p in model.iterdir()) == ["1", "2", "3"]  # no staging folder left
    assert (model / "1" / "checkpoint.pt").read_bytes() == source.read_bytes()
    sidecar = json.loads((model / "1" / SIDECAR_NAME).read_text())
    assert sidecar["size"] == source.stat().st_size
    assert sidecar["metric"] == "AP" and sidecar["value"] == 0.5
    import hashlib

    assert sidecar["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    resolved = resolve(model)
    assert resolved is not None and resolved.version == 3 and resolved.sidecar["size"] > 0


def test_publish_never_lands_on_an_existing_number(tmp_path: Path) -> None:
    model = tmp_path / "pose"
    (model / "4").mkdir(parents=True)  # an operator's half-made folder: not a version, not overwritten
    (model / "4" / "notes.txt").write_text("copying")
    assert publish_version(model, checkpoint_bytes()) == 5
    assert (model / "4" / "notes.txt").read_text() == "copying"


def test_a_failed_publish_leaves_nothing_behind(tmp_path: Path) -> None:
    model = tmp_path / "pose"
    publish_version(model, checkpoint_bytes())

    def broken_writer(path: Path) -> None:
        path.write_bytes(b"PK\x03\x04 half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_version(model, broken_writer)
    with pytest.raises(FileNotFoundError):
        publish_version(model, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="sha256"):
        publish_version(model, checkpoint_bytes(), metadata={"sha256": "x"})
    assert sorted(p.name for p in model.iterdir()) == ["1"]


def test_concurrent_publishers_in_threads_get_distinct_numbers(tmp_path: Path) -> None:
    model = tmp_path / "pose"
    count = 8
    # Every publisher finishes staging before any renames, so all of them race for number 1.
    barrier = threading.Barrier(count)
    numbers: list[int] = []
    errors: list[BaseException] = []

    def writer(path: Path) -> None:
        path.write_bytes(checkpoint_bytes())
        barrier.wait()

    def publish() -> None:
        try:
            numbers.append(publish_version(model, writer))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(numbers) == list(range(1, count + 1))
    assert list_versions(model) == list(range(1, count + 1))


def _publish_in_process(model: str, barrier: object, queue: object) -> None:
    def writer(path: Path) -> None:
        path.write_bytes(checkpoint_bytes())
        barrier.wait()  # type: ignore[attr-defined]

    queue.put(publish_version(Path(model), writer))  # type: ignore[attr-defined]


def test_concurrent_publishers_in_processes_get_distinct_numbers(tmp_path: Path) -> None:
    model = tmp_path / "pose"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    queue = context.Queue()
    processes = [context.Process(target=_publish_in_process, args=(str(model), barrier, queue)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    assert [p.exitcode for p in processes] == [0, 0]
    assert sorted([queue.get(), queue.get()]) == [1, 2]
    assert list_versions(model) == [1, 2]
