"""A Redis restart (append-only file on) while one job runs and two wait loses no accepted job.

About 10 s: a real redis-server, a real ``ditepose worker`` process and the REST API in-process."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ditepose.service.core.settings import ModelSpec
from tests.reliability.support import record
from tests.service.conftest import start_server
from tests.service.jobs import support as jobs_support
from tests.service.jobs.support import RedisServer, TinyEval, WorkerProcess, wait_for

tiny_eval = jobs_support.tiny_eval  # fixture


@pytest.fixture()
def job_env(tiny_eval: TinyEval, tmp_path: Path) -> Iterator[tuple[dict[str, str], RedisServer]]:
    redis = RedisServer(tmp_path / "redis", persist=True)
    redis.start()
    env = tiny_eval.env(tmp_path / "jobs", redis.url, DITEPOSE_JOB_QUEUE=f"eval-{uuid.uuid4().hex[:8]}",
                        DITEPOSE_VISIBILITY_TIMEOUT_S="5", DITEPOSE_LOCK_TTL_S="3")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env, redis
    redis.stop()


def _state(client: httpx.Client, location: str) -> str | None:
    try:
        response = client.get(location)
    except httpx.HTTPError:
        return None
    return response.json().get("state") if response.status_code == 200 else None


def test_redis_restart_loses_no_accepted_job(job_env: tuple, tiny_eval: TinyEval, reference_dir: Path,
                                             tmp_path: Path) -> None:
    env, redis = job_env
    worker = WorkerProcess(env, tmp_path / "worker.log")
    models = [ModelSpec(name="hrnet18", checkpoint=reference_dir / "dite_hrnet_18_coco_random.pth")]
    try:
        with start_server(models=models, redis_url=redis.url) as live, live.client() as client:
            body = {"dataset": "coco-mini-val", "checkpoint": tiny_eval.checkpoint, "max_images": 3}
            accepted = [client.post("/v1/evaluate", json=body) for _ in range(3)]
            assert all(r.status_code == 202 for r in accepted), [r.text for r in accepted]
            locations = [r.headers["Location"] for r in accepted]
            wait_for(lambda: _state(client, locations[0]) == "running", timeout=120, what="first job running")
            states_at_restart = [_state(client, loc) for loc in locations]
            redis.stop()
            time.sleep(1.0)  # the running job (~0.4 s) ends while Redis is away
            redis.start()  # same port, same directory: the append-only file is replayed
            final = [wait_for(lambda loc=loc: _state(client, loc) in ("succeeded", "failed", "cancelled")
                              and client.get(loc).json(), timeout=60, interval=0.2, what=loc) for loc in locations]
    finally:
        worker.stop()
    lost = sum(1 for job in final if job["state"] != "succeeded")
    requeued = "re-queueing the job" in worker.log()
    assert lost == 0, [(j["id"], j["state"], j.get("error")) for j in final]
    record("faults", "Redis restart (AOF) with jobs running and queued", injected=1, jobs_accepted=len(final),
           jobs_lost=lost, detail=f"states at restart: {states_at_restart}; all {len(final)} succeeded"
                  + ("; the running one was re-queued after Redis returned" if requeued else ""))
