"""Jobs through the REST API on a real Redis with real ``ditepose worker`` processes."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ditepose.service.core.settings import ModelSpec, Settings
from ditepose.service.http.deps import context_of
from ditepose.service.jobs.manager import JobService
from ditepose.service.jobs.schemas import EvaluateRequest
from tests.service.conftest import LiveServer, assert_error, start_server
from tests.service.jobs.support import (
    RedisServer,
    TinyEval,
    WorkerProcess,
    direct_evaluation,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Low enough that a killed worker's task comes back within seconds.
FAST_RECOVERY = {"DITEPOSE_VISIBILITY_TIMEOUT_S": "5", "DITEPOSE_LOCK_TTL_S": "3"}


@pytest.fixture(scope="module")
def job_env(tiny_eval: TinyEval, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, str]]:
    """DITEPOSE_* job settings for the API (this process) and the workers (children)."""
    env = tiny_eval.env(tmp_path_factory.mktemp("jobs"), redis_server.url,
                        DITEPOSE_JOB_QUEUE=f"eval-{uuid.uuid4().hex[:8]}", **FAST_RECOVERY)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


@pytest.fixture(scope="module")
def worker(job_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    port = free_port()
    proc = WorkerProcess(job_env, tmp_path_factory.mktemp("worker") / "worker.log", "--metrics-port", str(port))
    proc.metrics_port = port  # type: ignore[attr-defined]
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api(job_env: dict[str, str], redis_server: RedisServer, reference_dir: Path) -> Iterator[LiveServer]:
    models = [ModelSpec(name="hrnet18", checkpoint=reference_dir / "dite_hrnet_18_coco_random.pth")]
    with start_server(models=models, redis_url=redis_server.url) as live:
        yield live


def _poll(client: httpx.Client, location: str, timeout: float = 120, states: tuple = ("succeeded", "failed",
          "cancelled")) -> dict[str, Any]:
    return wait_for(lambda: (b := client.get(location).json()) and b.get("state") in states and b,
                    timeout=timeout, interval=0.1, what=f"{location} to reach {states}")


def test_evaluate_on_a_worker_matches_direct_evaluation(api: LiveServer, worker: WorkerProcess,
                                                        tiny_eval: TinyEval) -> None:
    with api.client() as client:
        response = client.post("/v1/evaluate", json={"dataset": "tiny", "checkpoint": tiny_eval.checkpoint,
                                                     "batch_size": 2})
        assert response.status_code == 202, response.text
        location = response.headers["Location"]
        job_id = response.json()["id"]
        assert location == f"/v1/jobs/{job_id}"
        body = _poll(client, location)
        assert body["state"] == "succeeded", (body, worker.log()[-3000:])
        expected, preds = direct_evaluation(tiny_eval, tiny_eval.ann_file)
        assert list(body["metrics"]) == ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]
        for name, value in expected.items():
            assert body["metrics"][name] == pytest.approx(value, abs=1e-9), name
        assert body["progress"] == 100.0 and body["attempts"] == 1 and body["num_persons"] == len(preds)
        assert body["timings"]["run_s"] > 0 and body["timings"]["inference_s"] > 0
        assert body["request"]["checkpoint"] == tiny_eval.checkpoint
        predictions = client.get(body["predictions_url"])
        assert predictions.status_code == 200
        doc = predictions.json()
        assert doc["job_id"] == job_id and sum(len(i["persons"]) for i in doc["images"]) == len(preds)
        listed = client.get("/v1/jobs").json()["jobs"]
        assert listed[0]["id"] == job_id
        scrape = client.get("/metrics").text
        assert 'ditepose_jobs_submitted_total{dataset="tiny"} 1.0' in scrape
        assert 'ditepose_job_records{state="succeeded"} 1.0' in scrape
        ready = client.get("/readyz").json()
        assert ready["jobs"] == {"mode": "celery", "ready": True}
    worker_scrape = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics").text  # type: ignore[attr-defined]
    assert 'ditepose_jobs_finished_total{state="succeeded"} 1.0' in worker_scrape
    assert "ditepose_job_duration_seconds_bucket" in worker_scrape

    # The API restarts: the record, its metrics and its predictions are still there (Redis).
    settings = context_of(api.app).settings
    with start_server(models=settings.models, redis_url=settings.redis_url) as again, again.client() as client:
        body2 = client.get(location).json()
        assert body2["metrics"] == body["metrics"] and body2["finished_at"] == body["finished_at"]
        assert client.get(body["predictions_url"]).json() == doc


def test_served_model_and_bad_requests(api: LiveServer, worker: WorkerProcess) -> None:
    with api.client() as client:
        response = client.post("/v1/evaluate", json={"dataset": "tiny", "model": "hrnet18", "flip_test": False,
                                                     "decoder": "dark"})
        assert response.status_code == 202, response.text
        body = _poll(client, response.headers["Location"])
        assert body["state"] == "succeeded", body
        assert body["demo_weights"] is False and set(body["metrics"]) >= {"AP", "AR"}
        assert_error(client.post("/v1/evaluate", json={"dataset": "nope"}), 404, "unknown_dataset")
        assert_error(client.post("/v1/evaluate", json={"dataset": "../tiny"}), 422, "invalid_request")
        assert_error(client.post("/v1/evaluate", json={"dataset": "/etc/passwd"}), 422, "invalid_request")
        assert_error(client.post("/v1/evaluate", json={"dataset": "tiny", "checkpoint": "../tiny.pth"}),
                     422, "invalid_request")
        assert_error(client.post("/v1/evaluate", json={"dataset": "tiny", "model": "nope"}), 404, "unknown_model")
        assert_error(client.post("/v1/evaluate", json={"dataset": "tiny", "ann_file": "/x"}), 422, "invalid_request")
        assert_error(client.post("/v1/evaluate", json={"dataset": "tiny", "batch_size": 0}), 422, "invalid_request")
        assert_error(client.get("/v1/jobs/0123"), 404, "unknown_job")
        assert_error(client.post("/v1/evaluate", content=b"{", headers={"content-type": "application/json"}),
                     422, "invalid_request")
        assert len(client.get("/v1/jobs", params={"limit": 1}).json()["jobs"]) == 1
        schema = client.get("/openapi.json").json()
        assert "EvaluateRequest" in schema["components"]["schemas"]
        assert {"/v1/evaluate", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/predictions"} <= set(schema["paths"])
        assert_error(client.delete(f"/v1/jobs/{body['id']}"), 409, "job_finished")


def test_cancel_queued_and_running_jobs(api: LiveServer, worker: WorkerProcess) -> None:
    with api.client() as client:
        slow = {"dataset": "coco-mini-val", "checkpoint": "tiny", "batch_size": 1}
        first = client.post("/v1/evaluate", json=slow).headers["Location"]
        second = client.post("/v1/evaluate", json=slow).headers["Location"]
        wait_for(lambda: (b := client.get(first).json())["state"] == "running" and b["progress"] > 0,
                 timeout=60, what="the first job to be under way")
        queued = client.delete(second).json()  # one worker slot, busy: the second job waits in Redis
        assert queued["state"] == "cancelled"
        running = client.delete(first).json()
        assert running["state"] in ("running", "cancelled") and running["cancel_requested"] is True
        done = _poll(client, first, timeout=60)
        assert done["state"] == "cancelled" and done["progress"] < 100 and done["metrics"] is None
        assert_error(client.get(f"{first}/predictions"), 409, "not_ready")
        time.sleep(1.0)  # the revoked second job reaches the worker and is dropped
        again = client.get(second).json()
        assert again["state"] == "cancelled" and again["attempts"] == 0


@pytest.mark.slow
def test_killed_worker_job_is_finished_by_another_exactly_once(
    job_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(job_env, DITEPOSE_JOB_QUEUE=f"kill-{uuid.uuid4().hex[:8]}")
    service = JobService(Settings(job_queue=env["DITEPOSE_JOB_QUEUE"]))  # the rest from job_env's variables
    first = WorkerProcess(env, tmp_path / "worker1.log")
    try:
        rec = service.submit(EvaluateRequest(dataset="coco-mini-val", checkpoint="tiny", batch_size=1))
        wait_for(lambda: (r := service.get(rec.id)).state == "running" and r.progress > 5, timeout=60,
                 what="the job to be under way on worker 1")
        first.kill()
        stale = service.get(rec.id)
        assert stale.state == "running" and stale.progress < 100 and stale.attempts == 1
        second = WorkerProcess(env, tmp_path / "worker2.log")
        try:
            done = wait_for(lambda: (r := service.get(rec.id)).state in ("succeeded", "failed") and r,
                            timeout=120, interval=0.2, what="worker 2 to finish the job")
            assert done.state == "succeeded", (done.error, second.log()[-3000:])
            assert done.attempts == 2 and done.worker != stale.worker and done.progress == 100.0
            doc = json.loads(Path(done.predictions).read_text())
            assert sum(len(i["persons"]) for i in doc["images"]) == done.result["num_persons"]
            assert list(Path(done.predictions).parent.iterdir()) == [Path(done.predictions)]  # no temp files left
            # Deliver the task once more: it is recognised as done and not run again.
            def answered_done() -> int:
                return sum(1 for line in second.log().splitlines()
                           if f"[{rec.id}] succeeded" in line and line.endswith("'done'"))

            before = answered_done()
            service.executor.submit(rec.id)
            wait_for(lambda: answered_done() > before, timeout=30, what="the duplicate to be answered 'done'")
            after = service.get(rec.id)
            assert (after.finished_at, after.attempts, after.result) == (done.finished_at, 2, done.result)
            runs = [line for log in (first.log(), second.log()) for line in log.splitlines()
                    if f"[{rec.id}] succeeded" in line and line.endswith("'succeeded'")]
            assert len(runs) == 1, runs  # one completed evaluation; every other delivery said 'done'
        finally:
            second.stop()
    finally:
        first.kill()
        service.close()


@pytest.mark.slow
def test_killed_pool_child_requeues_the_job_on_the_same_worker(job_env: dict[str, str], tmp_path: Path) -> None:
    """``task_reject_on_worker_lost``: the prefork child dies, its parent puts the task back at once."""
    env = dict(job_env, DITEPOSE_JOB_QUEUE=f"child-{uuid.uuid4().hex[:8]}")
    service = JobService(Settings(job_queue=env["DITEPOSE_JOB_QUEUE"]))
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        rec = service.submit(EvaluateRequest(dataset="coco-mini-val", checkpoint="tiny", batch_size=1))
        wait_for(lambda: (r := service.get(rec.id)).state == "running" and r.progress > 5, timeout=60,
                 what="the job to be under way")
        children = Path(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        os.kill(int(children[0]), signal.SIGKILL)
        done = wait_for(lambda: (r := service.get(rec.id)).state in ("succeeded", "failed") and r,
                        timeout=120, interval=0.2, what="the requeued job to finish")
        assert done.state == "succeeded", (done.error, worker.log()[-3000:])
        assert done.attempts == 2 and not done.worker.endswith(f":{children[0]}")  # a fresh pool child
        assert "WorkerLostError" in worker.log()
        runs = [line for line in worker.log().splitlines()
                if f"[{rec.id}] succeeded" in line and line.endswith("'succeeded'")]
        assert len(runs) == 1, runs
    finally:
        worker.stop()
        service.close()


def test_redis_down_jobs_unavailable_pose_still_served(
    tiny_eval: TinyEval, tmp_path: Path, reference_dir: Path, coco_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in tiny_eval.env(tmp_path / "jobs").items():
        monkeypatch.setenv(key, value)
    down = RedisServer(tmp_path / "redis")
    down.start()
    models = [ModelSpec(name="hrnet18", checkpoint=reference_dir / "dite_hrnet_18_coco_random.pth")]
    with start_server(models=models, redis_url=down.url) as live, live.client() as client:
        assert client.get("/readyz").json()["jobs"]["ready"] is True
        down.stop()
        ready = client.get("/readyz")
        assert ready.status_code == 200  # pose is still served, so the instance stays in rotation
        jobs = ready.json()["jobs"]
        assert jobs["mode"] == "celery" and jobs["ready"] is False and "Redis" in jobs["error"]
        started = time.monotonic()
        body = assert_error(client.post("/v1/evaluate", json={"dataset": "tiny", "checkpoint": "tiny"}),
                            503, "unavailable")
        assert "Redis" in body["error"]["message"] and time.monotonic() - started < 10
        assert_error(client.get("/v1/jobs"), 503, "unavailable")
        pose = client.post("/v1/pose", files={"image": ("a.jpg", coco_jpeg, "image/jpeg")},
                           data={"boxes": "[[261.96, 162.16, 107.47, 252.37]]"})
        assert pose.status_code == 200 and len(pose.json()["persons"]) == 1
