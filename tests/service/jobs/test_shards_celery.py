"""Sharded jobs on a real Redis with two real ``ditepose worker`` processes.

The data: 'demo-synthetic' at 400 images (the built-in generator; :func:`support.synth_eval`);
the model: the tiny 64x96 checkpoint of the other job tests. Shards of 50 images: 8 shards.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ditepose.service.core.settings import Settings
from ditepose.service.jobs.manager import JobService
from ditepose.service.jobs.records import JobRecord, RedisJobStore
from ditepose.service.jobs.schemas import EvaluateRequest, job_response
from ditepose.service.jobs.shards import merge_id, shard_id
from tests.service.jobs.support import (
    RedisServer,
    SynthEval,
    TinyEval,
    WorkerProcess,
    direct_evaluation,
    wait_for,
)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

# Low enough that a killed worker's shard comes back within seconds.
FAST_RECOVERY = {"DITEPOSE_VISIBILITY_TIMEOUT_S": "5", "DITEPOSE_LOCK_TTL_S": "3"}
SHARDED = {"dataset": "demo-synthetic", "checkpoint": "tiny", "flip_test": False, "shard_size": 50}
SHARDS = 8


@pytest.fixture(scope="module")
def job_env(tiny_eval: TinyEval, synth_eval: SynthEval, redis_server: RedisServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    env = tiny_eval.env(tmp_path_factory.mktemp("jobs"), redis_server.url,
                        DITEPOSE_JOB_QUEUE=f"shards-{uuid.uuid4().hex[:8]}",
                        DITEPOSE_DATASETS=json.dumps(synth_eval.datasets(tiny_eval)), **FAST_RECOVERY)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


@pytest.fixture(scope="module")
def workers(job_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    logs = tmp_path_factory.mktemp("workers")
    procs = [WorkerProcess(job_env, logs / f"worker{i}.log") for i in (1, 2)]
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="module")
def service(job_env: dict[str, str]) -> Iterator[JobService]:
    """The API's job service (what the /v1 job routes call; settings from job_env's variables). The
    route's body is :func:`job_response` of :meth:`JobService.get`, which the tests read the same way."""
    svc = JobService(Settings())
    yield svc
    svc.close()


def _get(service: JobService, job_id: str) -> dict[str, Any]:
    """GET /v1/jobs/{id}'s body."""
    rec = service.get(job_id)
    assert rec is not None
    return job_response(rec, time.time()).model_dump()


@pytest.fixture(scope="module")
def store(redis_server: RedisServer) -> Iterator[RedisJobStore]:
    """The stored records, read directly (shard records are not served by the API)."""
    s = RedisJobStore(redis_server.url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def expected(tiny_eval: TinyEval, synth_eval: SynthEval) -> dict[str, float]:
    """What ``ditepose evaluate``'s loop gives for the tiny checkpoint on the 400 images."""
    return direct_evaluation(tiny_eval, synth_eval.ann_file, img_dir=synth_eval.img_dir, flip_test=False)[0]


def _poll(service: JobService, job_id: str, seen: list[dict[str, Any]] | None = None,
          timeout: float = 600) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = _get(service, job_id)
        if seen is not None:
            seen.append(body)
        return body if body["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout=timeout, interval=0.2, what=f"job {job_id} to finish")


def _shards(store: RedisJobStore, job_id: str) -> list[JobRecord]:
    recs = store.get_many([shard_id(job_id, i) for i in range(SHARDS)])
    assert all(r is not None for r in recs)
    return recs  # type: ignore[return-value]


def _completions(workers: list[WorkerProcess], task_id: str) -> int:
    """Runs of ``task_id`` that ended 'succeeded' (Celery's "Task ...[id] succeeded in ...: 'succeeded'")."""
    return sum(1 for w in workers for line in w.log().splitlines()
               if f"[{task_id}] succeeded" in line and line.endswith("'succeeded'"))


def test_eight_shards_on_two_workers_score_as_one_shard(
    service: JobService, workers: list[WorkerProcess], store: RedisJobStore, expected: dict[str, float]
) -> None:
    sharded = service.submit(EvaluateRequest(**SHARDED))
    whole = service.submit(EvaluateRequest(**{k: v for k, v in SHARDED.items() if k != "shard_size"}))
    seen: list[dict[str, Any]] = []
    a = _poll(service, sharded.id, seen)
    b = _poll(service, whole.id)
    logs = "\n".join(w.log()[-2000:] for w in workers)
    assert a["state"] == b["state"] == "succeeded", (a["error"], b["error"], logs)
    assert a["metrics"] == b["metrics"] == expected  # to the last digit
    assert a["num_images"] == b["num_images"] == 400 and a["num_persons"] == b["num_persons"]
    assert a["shards"]["total"] == a["shards"]["succeeded"] == SHARDS and b["shards"] is None
    assert a["progress"] == 100.0 and a["predictions_url"]
    # progress while it ran: shards done out of the total plus the running ones' part, never backwards
    running = [s for s in seen if s["state"] == "running" and s["shards"] is not None]
    assert running and any(0 < s["progress"] < 100 for s in running)
    assert [s["progress"] for s in running] == sorted(s["progress"] for s in running)
    docs = [json.loads(Path(service.get(r.id).predictions).read_text()) for r in (sharded, whole)]
    assert docs[0]["images"] == docs[1]["images"]
    # shard records are not jobs: the list shows the two jobs, a shard id is unknown to the API
    listed = [j.id for j in service.recent()]
    assert a["id"] in listed and not any("-s0" in j or "-merge" in j for j in listed)
    assert service.get(shard_id(a["id"], 0)) is None
    recs = _shards(store, a["id"])
    assert all(r.state == "succeeded" and r.attempts == 1 for r in recs)
    assert [r.plan["images"] for r in recs] == [[i * 50, i * 50 + 50] for i in range(SHARDS)]
    assert store.get(merge_id(a["id"])).state == "succeeded"


def test_sigkill_of_a_worker_mid_job_redoes_only_its_shard(
    job_env: dict[str, str], store: RedisJobStore, expected: dict[str, float], tmp_path: Path
) -> None:
    env = dict(job_env, DITEPOSE_JOB_QUEUE=f"kill-{uuid.uuid4().hex[:8]}")
    first, second = (WorkerProcess(env, tmp_path / f"worker{i}.log") for i in (1, 2))
    service = JobService(Settings(job_queue=env["DITEPOSE_JOB_QUEUE"]))
    try:
        rec = service.submit(EvaluateRequest(**SHARDED, batch_size=4))

        def both_busy() -> list[JobRecord] | None:
            recs = store.get_many([shard_id(rec.id, i) for i in range(SHARDS)])
            live = [r for r in recs if r is not None and r.state == "running" and r.progress > 0]
            return live if len({r.worker for r in live}) == 2 else None

        wait_for(both_busy, timeout=300, interval=0.05, what="a shard under way on each worker")
        children = Path(f"/proc/{first.proc.pid}/task/{first.proc.pid}/children").read_text().split()
        assert len(children) == 1, children  # --concurrency 1: one pool child, which names the lease
        victim = f":{children[0]}"
        first.kill()
        killed = [r for r in _shards(store, rec.id) if r.state == "running" and r.worker.endswith(victim)]
        assert len(killed) == 1, killed  # the shard it was running, now with nobody renewing its lease
        done = wait_for(lambda: (r := service.get(rec.id)).state in ("succeeded", "failed", "cancelled") and r,
                        timeout=600, interval=0.2, what="worker 2 to finish the job")
        assert done.state == "succeeded", (done.error, second.log()[-3000:])
        assert done.result["metrics"] == expected
        recs = _shards(store, rec.id)
        assert all(r.state == "succeeded" for r in recs), [r.state for r in recs]
        redone = [r for r in recs if r.attempts > 1]
        assert [r.id for r in redone] == [killed[0].id], [(r.id, r.attempts, r.worker) for r in recs]
        assert redone[0].attempts == 2 and not redone[0].worker.endswith(victim)  # finished by worker 2
        # exactly once, counted from the stored records and from both workers' logs
        # a record turns 'succeeded' before Celery logs the task's return (the last shard also merges
        # first): wait for every shard's line, then count that none ran to the end twice
        wait_for(lambda: all(_completions([first, second], r.id) >= 1 for r in recs), timeout=60, interval=0.2,
                 what="every shard's completion in the workers' logs")
        assert all(_completions([first, second], r.id) == 1 for r in recs)
        merge = store.get(merge_id(rec.id))
        assert merge.state == "succeeded" and merge.attempts == 1 and _completions([first, second], rec.id) == 0
        assert sorted(s["index"] for s in done.result["shards"]) == list(range(SHARDS))
        doc = json.loads(Path(done.predictions).read_text())
        ids = [p["id"] for img in doc["images"] for p in img["persons"]]
        assert sorted(ids) == list(range(done.result["num_persons"]))  # every person once, none twice
    finally:
        first.kill()
        second.stop()
        service.close()


def test_cancel_mid_job_stops_the_remaining_shards(
    service: JobService, workers: list[WorkerProcess], store: RedisJobStore
) -> None:
    job_id = service.submit(EvaluateRequest(**SHARDED, batch_size=2)).id
    wait_for(lambda: (b := _get(service, job_id))["shards"] is not None and b["shards"]["running"] >= 1
             and b["progress"] > 0, timeout=300, interval=0.05, what="the job's shards to be under way")
    cancelled = service.cancel(job_id)
    assert cancelled is not None and cancelled.cancel_requested is True
    done = _poll(service, job_id, timeout=120)
    assert done["state"] == "cancelled" and done["metrics"] is None and done["predictions_url"] is None
    recs = _shards(store, job_id)
    states = [r.state for r in recs]
    assert "running" not in states and "queued" not in states and states.count("cancelled") >= 1, states
    never_started = [r for r in recs if r.attempts == 0]
    assert never_started and all(r.state == "cancelled" for r in never_started)
    time.sleep(2.0)  # revoked or redelivered copies reach the workers: none runs a shard again
    again = _shards(store, job_id)
    assert [(r.state, r.attempts) for r in again] == [(r.state, r.attempts) for r in recs]
    assert store.get(merge_id(job_id)).attempts == 0
