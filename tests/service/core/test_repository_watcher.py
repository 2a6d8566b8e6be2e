"""The repository watcher at start-up and for --model checkpoints (real pools, real checkpoints)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ditepose.model.repository import ModelManifest, write_manifest
from ditepose.service.core.serving import build_pool
from ditepose.service.core.settings import ModelSpec, Settings
from tests.service.conftest import LiveServer
from tests.service.core.swap_support import (
    API_KEY,
    HEADERS,
    model_entry,
    publish,
    repository_settings,
    tiny_module,
)


def test_start_serves_the_newest_version_that_passes_and_reports_the_rejected_one(tmp_path: Path) -> None:
    model_dir = tmp_path / "repository" / "pose"
    publish(model_dir, seed=1)
    publish(model_dir, seed=2, corrupt="nan")
    served = build_pool(repository_settings(tmp_path / "repository"))
    pool, watcher = served.pool, served.watcher
    assert watcher is not None
    try:
        assert list(pool.models) == ["pose"]  # no default demo model beside the repository
        assert pool.models["pose"].version == "1" and pool.models["pose"].source == "repository"
        state = watcher.describe("pose")
        assert state["served_version"] == "1" and state["available_versions"] == [1, 2]
        assert "not finite" in state["failed_versions"]["2"]
        assert watcher.load_failures == {("pose", "2"): 1}
    finally:
        served.stop()


def test_a_pin_to_a_bad_version_at_start_is_not_substituted(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    publish(repository / "pose", seed=1)
    publish(repository / "pose", seed=2, corrupt="keys")
    write_manifest(repository / "pose", ModelManifest(version=2))
    publish(repository / "other", seed=3)
    served = build_pool(repository_settings(repository))
    pool, watcher = served.pool, served.watcher
    assert watcher is not None
    try:
        assert list(pool.models) == ["other"]
        assert "version 2" in pool.failed_models["pose"]
        assert watcher.describe("pose")["state"] == "failed"
    finally:
        served.stop()


def test_reloading_a_model_flag_swaps_when_the_file_changed(tmp_path: Path) -> None:
    from ditepose import model as models

    path = tmp_path / "flag.pth"
    module, meta = tiny_module(seed=1)
    models.save_checkpoint(path, module, meta)
    first = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    settings = Settings(_env_file=None, grpc_enabled=False, devices="cpu", workers_per_device=1, api_key=API_KEY,
                        models=[ModelSpec(name="flag", checkpoint=path)])
    with LiveServer(settings) as live, live.client(headers=HEADERS) as client:
        assert model_entry(client, "flag")["version"] == first
        assert model_entry(client, "flag")["source"] == "flag"
        same = client.post("/v1/models/flag/reload").json()
        assert same["swapped"] is False and same["served_version"] == first

        module, meta = tiny_module(seed=2)
        models.save_checkpoint(path, module, meta)
        second = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        assert second != first
        swapped = client.post("/v1/models/flag/reload").json()
        assert swapped["swapped"] is True and swapped["previous_version"] == first
        assert swapped["served_version"] == second and model_entry(client, "flag")["version"] == second

        path.write_bytes(path.read_bytes()[:1000])  # a broken overwrite: reported, the last good one serves
        broken = client.post("/v1/models/flag/reload").json()
        assert broken["swapped"] is False and broken["served_version"] == second and broken["error"]
        assert model_entry(client, "flag")["version"] == second
