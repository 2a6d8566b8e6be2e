"""``ditepose train --publish``: each new best checkpoint becomes the next version of a repository model."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from ditepose.cli import main
from ditepose.model.repository import (
    MANIFEST_NAME,
    SIDECAR_NAME,
    ModelManifest,
    list_versions,
    resolve,
    scan,
    write_manifest,
)
from tests.training.conftest import TINY, synth_set


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_set(tmp_path_factory, "publish_data", 3, 2, 21)


def train(data: Path, work: Path, *extra: str) -> int:
    """A tiny run with one validation (and so one best checkpoint) per epoch."""
    return main(["train", "dite_hrnet_18", "--data", str(data), "--work-dir", str(work), "--epochs", "1",
                 "--global-batch", "4", "--input", "64x64", "--workers", "0", "--eval-every", "1",
                 "--max-people", "4", "--quiet", "--model-overrides", json.dumps(TINY), *extra])


def summary_of(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_publish_writes_loadable_versions_and_a_manifest(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ditepose.service.core.model_loader import load_model
    from ditepose.service.core.settings import ModelSpec

    repository = tmp_path / "repository"
    assert train(data, tmp_path / "run1", "--publish", str(repository / "pose")) == 0
    summary = summary_of(capsys)
    assert summary["publish"]["errors"] == []
    assert [v["version"] for v in summary["publish"]["versions"]] == [1]
    assert scan(repository) == {"pose": repository / "pose"}
    model_dir = repository / "pose"
    assert list_versions(model_dir) == [1]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", MANIFEST_NAME]  # no staging folder left

    # The manifest says how to serve the run and pins nothing.
    manifest = ModelManifest.from_file(model_dir / MANIFEST_NAME)
    assert manifest == ModelManifest(arch="dite_hrnet_18", dataset="coco", input_size=(64, 64),
                                     flip_test=True, decoder="default")
    resolved = resolve(model_dir)
    assert resolved is not None and (resolved.version, resolved.pinned) == (1, False)
    # The published bytes are the run's best checkpoint, with what made it the best beside them.
    assert resolved.checkpoint.read_bytes() == (tmp_path / "run1" / "best.pt").read_bytes()
    sidecar = json.loads((model_dir / "1" / SIDECAR_NAME).read_text())
    assert sidecar["metric"] == "AP" and sidecar["epoch"] == 1 and sidecar["value"] == summary["best"]["value"]

    # The service's own loader serves it: build from the resolved checkpoint + manifest options, run it.
    spec = ModelSpec(name=resolved.name, checkpoint=resolved.checkpoint, input_size=manifest.input_size)
    loaded = load_model(spec)
    assert (loaded.arch, loaded.dataset, loaded.input_size, loaded.demo_weights) == (
        "dite_hrnet_18", "coco", (64, 64), False)
    with torch.inference_mode():
        heatmaps = loaded.module(torch.rand(2, 3, 64, 64))
    assert heatmaps.shape == (2, 17, 16, 16) and torch.isfinite(heatmaps).all()

    # The operator tunes the manifest; the next run publishes version 2 and leaves the manifest alone.
    write_manifest(model_dir, ModelManifest(input_size=(64, 64), max_batch_size=4, precision="fp32"))
    assert train(data, tmp_path / "run2", "--publish", str(model_dir)) == 0
    assert [v["version"] for v in summary_of(capsys)["publish"]["versions"]] == [2]
    assert list_versions(model_dir) == [1, 2]
    assert ModelManifest.from_file(model_dir / MANIFEST_NAME).max_batch_size == 4
    resolved = resolve(model_dir)
    assert resolved is not None and resolved.version == 2
    assert resolved.checkpoint.read_bytes() == (tmp_path / "run2" / "best.pt").read_bytes()
    assert load_model(ModelSpec(name="pose", checkpoint=resolved.checkpoint)).input_size == (64, 64)


def test_publish_refuses_a_manifest_that_serves_another_input_size(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "repository" / "pose"
    write_manifest(model_dir, ModelManifest(input_size=(192, 256)))
    assert train(data, tmp_path / "run", "--publish", str(model_dir)) == 2
    err = capsys.readouterr().err
    assert "input_size" in err and "256x192" in err and "64x64" in err
    assert not (tmp_path / "run" / "best.pt").exists()  # refused before any training
    assert list_versions(model_dir) == []


def test_publish_needs_validation(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "repository" / "pose"
    assert train(data, tmp_path / "run", "--eval-every", "0", "--publish", str(model_dir)) == 2
    assert "need validation: eval_every is 0" in capsys.readouterr().err
    assert train(data, tmp_path / "run", "--publish", str(tmp_path / "repository" / ".hidden")) == 2
    assert "dot-folders" in capsys.readouterr().err
    assert not model_dir.exists()


def test_a_failed_publish_keeps_training_and_fails_the_command(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk cannot be produced here (the tests may run as root on a roomy disk), so the
    # repository write is replaced by one that fails as a full disk would.
    import ditepose.training.publish as publish_module

    def disk_full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(publish_module, "publish_version", disk_full)
    model_dir = tmp_path / "repository" / "pose"
    assert train(data, tmp_path / "run", "--publish", str(model_dir)) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["publish"]["versions"] == [] and "No space left" in summary["publish"]["errors"][0]
    assert "not published" in captured.err
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "final.pt").is_file()
    assert list_versions(model_dir) == []


def test_publish_command_adds_a_checkpoint_that_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ditepose.model import build_model
    from ditepose.service.core.model_loader import load_model
    from ditepose.service.core.settings import ModelSpec

    # An authors'-layout (mmpose) checkpoint: no metadata of ours, recognised by its layout.
    authors = tmp_path / "ditehrnet_18_coco_256x192.pth"
    torch.save({"state_dict": build_model("dite_hrnet_18").state_dict(), "meta": {}}, authors)
    model_dir = tmp_path / "repository" / "hrnet18"
    assert main(["publish", str(authors), str(model_dir), "--metadata", '{"ticket": "OPS-1"}']) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["version"], result["arch"], result["dataset"]) == (1, "dite_hrnet_18", "coco")
    assert ModelManifest.from_file(model_dir / MANIFEST_NAME) == ModelManifest(
        arch="dite_hrnet_18", dataset="coco", input_size=(192, 256))
    assert json.loads((model_dir / "1" / SIDECAR_NAME).read_text())["ticket"] == "OPS-1"
    resolved = resolve(model_dir)
    assert resolved is not None and resolved.version == 1
    loaded = load_model(ModelSpec(name="hrnet18", checkpoint=resolved.checkpoint))
    with torch.inference_mode():
        assert loaded.module(torch.rand(1, 3, 256, 192)).shape == (1, 17, 64, 48)

    # What the service could not load is never published.
    broken = tmp_path / "broken.pth"
    broken.write_bytes(authors.read_bytes()[:1000])
    assert main(["publish", str(broken), str(model_dir)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert main(["publish", str(authors), str(model_dir), "--input", "256x192", "--metadata", "[1]"]) == 2
    assert "JSON object" in capsys.readouterr().err
    assert main(["publish", str(authors), str(model_dir), "--input", "384x288"]) == 2
    assert "serves input_size 256x192" in capsys.readouterr().err
    assert list_versions(model_dir) == [1]
