"""Sharded jobs in embedded mode (no Redis): the same shards on the executor's threads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.settings import Settings
from ditepose.service.jobs.manager import JobService
from ditepose.service.jobs.metrics import JobMetrics
from ditepose.service.jobs.plan import shard_ranges
from ditepose.service.jobs.records import JobRecord, LocalJobStore
from ditepose.service.jobs.schemas import EvaluateRequest
from ditepose.service.jobs.shards import (
    merge,
    merge_id,
    read_shard,
    run_shard,
    shard_file,
    shard_id,
    write_shard,
)
from tests.service.jobs.support import SynthEval, TinyEval, direct_evaluation, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _service(tiny: TinyEval, synth: SynthEval, tmp_path: Path, pool: WorkerPool, **overrides: object) -> JobService:
    settings = Settings(_env_file=None, redis_url=None, datasets=synth.datasets(tiny),
                        checkpoint_dir=tiny.checkpoint_dir, jobs_dir=tmp_path / "jobs", **overrides)
    return JobService(settings, lambda: pool, metrics=JobMetrics())


def _finished(service: JobService, job_id: str) -> JobRecord | None:
    rec = service.get(job_id)
    return rec if rec is not None and rec.state in ("succeeded", "failed", "cancelled") else None


def test_shard_ranges_cover_every_image_once() -> None:
    assert shard_ranges(400, 50, 32) == [(i * 50, i * 50 + 50) for i in range(8)]
    assert shard_ranges(401, 50, 32)[-1][1] == 401 and len(shard_ranges(401, 50, 32)) == 9
    assert shard_ranges(400, 50, 4) == [(0, 100), (100, 200), (200, 300), (300, 400)]  # max_shards wins
    assert shard_ranges(3, 500, 32) == [(0, 3)] and shard_ranges(0, 500, 32) == [(0, 0)]
    sizes = [b - a for a, b in shard_ranges(1000, 300, 32)]
    assert sum(sizes) == 1000 and max(sizes) - min(sizes) <= 1


def test_sharded_job_scores_as_one_shard_and_as_ditepose_evaluate(
    tiny_eval: TinyEval, synth_eval: SynthEval, tmp_path: Path, job_pool: WorkerPool
) -> None:
    service = _service(tiny_eval, synth_eval, tmp_path, job_pool, embedded_workers=2)
    try:
        request = {"dataset": "demo-synthetic", "checkpoint": tiny_eval.checkpoint, "flip_test": False,
                   "batch_size": 16}
        sharded = service.submit(EvaluateRequest(**request, shard_size=50))
        whole = service.submit(EvaluateRequest(**request))  # the default shard_size (500): one shard
        a = wait_for(lambda: _finished(service, sharded.id), timeout=600, interval=0.2, what="the sharded job")
        b = wait_for(lambda: _finished(service, whole.id), timeout=600, interval=0.2, what="the unsharded job")
        assert a.state == b.state == "succeeded", (a.error, b.error)
        assert a.shards == 8 and b.shards == 0 and a.shard_status["succeeded"] == 8
        assert a.plan["shards"][0] == [0, 50] and "shards" not in b.plan
        assert [s["images"] for s in a.result["shards"]] == [[i * 50, i * 50 + 50] for i in range(8)]
        assert a.result["metrics"] == b.result["metrics"]  # to the last digit
        assert a.result["num_persons"] == b.result["num_persons"] and a.result["num_images"] == 400
        expected, preds = direct_evaluation(tiny_eval, synth_eval.ann_file, img_dir=synth_eval.img_dir,
                                            flip_test=False)
        # ditepose evaluate's loop on the plain module (batches of 8, not the pool's): the same numbers
        assert a.result["metrics"] == expected
        doc_a, doc_b = (json.loads(Path(r.predictions).read_text()) for r in (a, b))
        assert doc_a["images"] == doc_b["images"]
        # one file per shard, no temporary files left
        assert sorted(p.name for p in (tmp_path / "jobs" / a.id / "shards").iterdir()) == \
            [f"shard-{i:04d}.json" for i in range(8)]
        # the job list shows jobs only, not their shards
        assert {r.id for r in service.recent()} == {a.id, b.id}
        assert service.get(shard_id(a.id, 0)) is None
        # a shard delivered again is answered 'done' and the job is not merged twice
        finished_at = a.finished_at
        assert run_shard(shard_id(a.id, 3), service.store, job_pool, tmp_path / "jobs") == "done"
        assert merge(a.id, service.store, tmp_path / "jobs") == "done"
        again = service.get(a.id)
        assert again.finished_at == finished_at and service.store.get(merge_id(a.id)).attempts == 1
        per_shard = [service.store.get(shard_id(a.id, i)) for i in range(8)]
        assert all(r.state == "succeeded" and r.attempts == 1 for r in per_shard)
        assert sum(r.result["persons"] for r in per_shard) == len(preds)
    finally:
        service.close()


def test_cancel_stops_every_shard_and_nothing_is_merged(
    tiny_eval: TinyEval, synth_eval: SynthEval, tmp_path: Path, job_pool: WorkerPool
) -> None:
    service = _service(tiny_eval, synth_eval, tmp_path, job_pool, embedded_workers=1)
    try:
        rec = service.submit(EvaluateRequest(dataset="demo-synthetic", checkpoint=tiny_eval.checkpoint,
                                             shard_size=50, batch_size=4))
        wait_for(lambda: (r := service.get(rec.id)).shard_status is not None and r.progress > 0, timeout=120,
                 interval=0.05, what="the first shard to be under way")
        cancelled = service.cancel(rec.id)
        assert cancelled.cancel_requested
        done = wait_for(lambda: _finished(service, rec.id), timeout=120, what="the cancel to stop the job")
        assert done.state == "cancelled" and done.result is None and done.predictions is None
        shards = [service.store.get(shard_id(rec.id, i)) for i in range(8)]
        assert all(s.state == "cancelled" for s in shards), [s.state for s in shards]
        assert sum(s.attempts for s in shards) == 1  # the running one; the queued ones never started
        assert service.store.get(merge_id(rec.id)).attempts == 0
        assert not (tmp_path / "jobs" / rec.id / "predictions.json").exists()
    finally:
        service.close()


def test_a_shard_file_that_is_not_that_shards_is_refused(tmp_path: Path) -> None:
    pred = {"image_id": 1, "image_file": "a.jpg", "bbox_id": 0, "bbox": [0.0, 0.0, 1.0, 1.0], "box_score": 1.0,
            "score": 0.5, "area": 1.0, "keypoints": np.arange(51, dtype=np.float32).reshape(17, 3) / 7}
    path = shard_file(tmp_path, "job", 2)
    write_shard(path, "job", 2, (10, 11), [pred])
    got = read_shard(path, "job", 2, 1)
    assert got[0]["keypoints"].dtype == np.float32 and np.array_equal(got[0]["keypoints"], pred["keypoints"])
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    for job, index, persons in (("other", 2, 1), ("job", 3, 1), ("job", 2, 2)):
        with pytest.raises(ValueError, match="not the complete predictions"):
            read_shard(path, job, index, persons)


def test_a_failing_shard_fails_the_job_and_stops_the_others(tmp_path: Path, job_pool: WorkerPool) -> None:
    store = LocalJobStore()
    job = JobRecord(id="j", state="running", shards=2, plan={"model": {}, "broken": True})
    store.create(job)
    for i in range(2):
        store.create(JobRecord(id=shard_id("j", i), parent="j", plan={"index": i, "images": [i, i + 1]}))
    store.create(JobRecord(id=merge_id("j"), parent="j"))
    assert run_shard(shard_id("j", 0), store, job_pool, tmp_path) == "failed"  # the plan cannot be read
    failed = store.get("j")
    assert failed.state == "failed" and "shard 0" in failed.error
    assert store.get(shard_id("j", 1)).state == "cancelled"  # queued: cancelled, never run
    assert run_shard(shard_id("j", 1), store, job_pool, tmp_path) == "done"
    assert store.get(merge_id("j")).attempts == 0
