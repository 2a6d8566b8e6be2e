"""Catalogue names and the job stores' compare-and-set contract (local and a real Redis)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ditepose.service.core.settings import DatasetSpec, Settings
from ditepose.service.jobs.catalogue import BadName, Catalogue, UnknownName
from ditepose.service.jobs.records import JobRecord, LocalJobStore, RedisJobStore
from tests.service.jobs.support import RedisServer


def _catalogue(tmp_path: Path) -> Catalogue:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "good.pth").write_bytes(b"x")
    (tmp_path / "secret.pth").write_bytes(b"x")
    (ckpts / "escape.pth").symlink_to(tmp_path / "secret.pth")
    spec = DatasetSpec(format="coco", ann_file=tmp_path / "a.json", img_dir=tmp_path)
    return Catalogue({"coco-val": spec}, ckpts)


@pytest.mark.parametrize("name", ["../coco-val", "/etc/passwd", "a/b", "..", "x\\y", "", " coco-val", "a" * 200])
def test_catalogue_rejects_paths_and_odd_names(tmp_path: Path, name: str) -> None:
    cat = _catalogue(tmp_path)
    with pytest.raises(BadName):
        cat.dataset(name)
    with pytest.raises(BadName):
        cat.checkpoint(name)


def test_catalogue_resolves_only_configured_names(tmp_path: Path) -> None:
    cat = _catalogue(tmp_path)
    assert cat.dataset("coco-val").spec.format == "coco"
    with pytest.raises(UnknownName, match="coco-val"):
        cat.dataset("coco-train")
    assert cat.checkpoint("good") == (tmp_path / "ckpts" / "good.pth").resolve()
    assert cat.checkpoint("good.pth") == cat.checkpoint("good")
    with pytest.raises(UnknownName):
        cat.checkpoint("escape.pth")  # a symlink out of the folder is not served
    with pytest.raises(UnknownName):
        cat.checkpoint("secret")
    assert cat.checkpoint_names() == ["escape.pth", "good.pth"]


def test_catalogue_from_settings_and_file(tmp_path: Path) -> None:
    extra = tmp_path / "datasets.json"
    extra.write_text(json.dumps({"mpii-val": {"format": "mpii", "ann_file": "v.json", "img_dir": "img",
                                              "gt_file": "gt.json"}}))
    settings = Settings(_env_file=None, datasets={"coco-val": {"format": "coco", "ann_file": "a.json", "img_dir": "i"}},
                        datasets_file=extra, jobs_dir=tmp_path / "jobs")
    assert Catalogue.from_settings(settings).dataset_names() == ["coco-val", "demo-synthetic", "mpii-val"]
    assert Catalogue.from_settings(settings.model_copy(update={"demo_dataset": False})).dataset_names() == [
        "coco-val", "mpii-val"]
    with pytest.raises(ValueError, match="gt_file"):
        DatasetSpec(format="mpii", ann_file=Path("v.json"), img_dir=Path("i"))
    with pytest.raises(ValueError, match="hard_time_limit_s"):
        Settings(_env_file=None, soft_time_limit_s=10, hard_time_limit_s=5)


@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalJobStore | RedisJobStore]:
    if request.param == "local":
        yield LocalJobStore(tmp_path / "records")
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    s = RedisJobStore(server.url, prefix=f"test{time.monotonic_ns()}")
    yield s
    s.close()


def test_claim_lease_and_finish_exactly_once(store: LocalJobStore | RedisJobStore) -> None:
    rec = JobRecord(id=JobRecord.new_id(), request={"dataset": "x"}, plan={"k": 1})
    store.create(rec)
    with pytest.raises(ValueError):
        store.create(rec)
    assert store.get(rec.id) == rec
    assert store.claim(rec.id, "t1", 30, "w1") == "run"
    assert store.claim(rec.id, "t2", 30, "w2") == "busy"  # a live lease: the redelivered copy waits
    assert store.heartbeat(rec.id, "t1", 30, 42.0) == (True, False)
    assert store.heartbeat(rec.id, "t2", 30, 1.0) == (False, False)
    assert not store.transition(rec.id, ["running"], "succeeded", "t2", result={"AP": 1})
    assert store.transition(rec.id, ["running"], "succeeded", "t1", result={"AP": 0.5}, progress=100.0)
    assert not store.transition(rec.id, ["running"], "succeeded", "t1", result={"AP": 0.9})
    got = store.get(rec.id)
    assert (got.state, got.result, got.attempts, got.worker) == ("succeeded", {"AP": 0.5}, 1, "w1")
    assert store.claim(rec.id, "t3", 30, "w3") == "done"  # never re-run
    assert store.counts()["succeeded"] == 1
    assert store.claim("nope", "t", 30, "w") == "missing"


def test_lapsed_lease_nobody_claimed_is_retaken(store: LocalJobStore | RedisJobStore) -> None:
    rec = JobRecord(id=JobRecord.new_id())
    store.create(rec)
    assert store.claim(rec.id, "slow", 0.2, "w1") == "run"
    time.sleep(0.35)  # a stalled process missed its renewals, but no other worker came
    assert store.heartbeat(rec.id, "slow", 30, 60.0) == (True, False)
    assert store.claim(rec.id, "other", 30, "w2") == "busy"
    assert store.transition(rec.id, ["running"], "succeeded", "slow")


def test_expired_lease_is_taken_over(store: LocalJobStore | RedisJobStore) -> None:
    rec = JobRecord(id=JobRecord.new_id())
    store.create(rec)
    assert store.claim(rec.id, "dead", 0.2, "w1") == "run"
    time.sleep(0.35)  # the dead worker stopped renewing
    assert store.claim(rec.id, "alive", 30, "w2") == "run"
    assert store.heartbeat(rec.id, "dead", 30, 50.0)[0] is False
    assert not store.transition(rec.id, ["running"], "succeeded", "dead")
    assert store.transition(rec.id, ["running"], "succeeded", "alive")
    got = store.get(rec.id)
    assert (got.attempts, got.worker, got.state) == (2, "w2", "succeeded")


def test_cancel_queued_and_running(store: LocalJobStore | RedisJobStore) -> None:
    queued, running = JobRecord(id=JobRecord.new_id()), JobRecord(id=JobRecord.new_id(), created_at=time.time() + 1)
    store.create(queued)
    store.create(running)
    assert store.request_cancel(queued.id) == "cancelled"
    assert store.claim(queued.id, "t", 30, "w") == "done"
    assert store.claim(running.id, "t", 30, "w") == "run"
    assert store.request_cancel(running.id) == "running"
    assert store.heartbeat(running.id, "t", 30, 10.0) == (True, True)
    assert store.transition(running.id, ["running"], "cancelled", "t", finished_at=time.time())
    assert store.request_cancel("missing") is None
    assert [r.id for r in store.recent(10)] == [running.id, queued.id]
    counts = store.counts()
    assert counts["cancelled"] == 2 and counts["running"] == 0


def test_local_store_survives_restart_and_fails_orphans(tmp_path: Path) -> None:
    root = tmp_path / "records"
    first = LocalJobStore(root)
    done, orphan = JobRecord(id="a" * 32), JobRecord(id="b" * 32)
    first.create(done)
    first.create(orphan)
    first.claim(done.id, "t", 30, "w")
    first.transition(done.id, ["running"], "succeeded", "t", result={"AP": 0.25})
    second = LocalJobStore(root)  # the API restarted: its embedded executor lost the queued job
    assert second.get(done.id).result == {"AP": 0.25}
    assert second.get(orphan.id).state == "failed"
    assert "restart" in second.get(orphan.id).error


def test_redis_records_survive_a_new_store(redis_server: RedisServer) -> None:
    prefix = f"restart{time.monotonic_ns()}"
    first = RedisJobStore(redis_server.url, prefix=prefix)
    rec = JobRecord(id=JobRecord.new_id(), request={"dataset": "tiny"})
    first.create(rec)
    first.close()
    second = RedisJobStore(redis_server.url, prefix=prefix)
    assert second.get(rec.id) == rec
    second.close()


def test_redis_records_survive_a_redis_restart_with_aof(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis-aof", persist=True)
    server.start()
    try:
        store = RedisJobStore(server.url, prefix="aof")
        rec = JobRecord(id=JobRecord.new_id(), request={"dataset": "tiny"})
        store.create(rec)
        assert store.claim(rec.id, "t", 30, "w") == "run"
        assert store.transition(rec.id, ["running"], "succeeded", "t", result={"AP": 0.5})
        store.close()
        server.stop()
        server.start()  # same port, same append-only file
        again = RedisJobStore(server.url, prefix="aof")
        got = again.get(rec.id)
        assert (got.state, got.result, got.attempts) == ("succeeded", {"AP": 0.5}, 1)
        assert again.counts()["succeeded"] == 1
        again.close()
    finally:
        server.stop()
