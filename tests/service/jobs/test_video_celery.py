"""Video jobs on a real Redis with two real ``ditepose worker`` processes: segments, stitching, recovery, cancel.

The video: the riders pan/zoom clip (90 frames at 30 frames/s, keyframes at 0, 30 and 60); with
``video_segment_s`` 1.0 the API cuts it into 3 segments of 30 frames, each one Celery task. The
model: the shipped demo checkpoint; detection by NanoDet every 5th frame, no flip test. The API
side is :class:`JobService` (what the /v1 routes call; tests/service/http/test_videos.py covers the
routes themselves).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ditepose.model.detectors import NanoDetDetector
from ditepose.service.core.settings import ModelSpec, Settings
from ditepose.service.jobs.manager import JobService
from ditepose.service.jobs.records import JobRecord, RedisJobStore
from ditepose.service.jobs.shards import merge_id, shard_id
from ditepose.service.jobs.video import RESULT_FILES, VideoPlan
from ditepose.service.jobs.video_schemas import VideoJobOptions
from ditepose.service.video.synthetic import write_riders_clip
from tests.service.jobs.support import RedisServer, WorkerProcess, wait_for

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

FAST_RECOVERY = {"DITEPOSE_VISIBILITY_TIMEOUT_S": "5", "DITEPOSE_LOCK_TTL_S": "3"}
OPTIONS = VideoJobOptions(flip_test=False, detect_interval=5)
SEGMENTS = 3


@pytest.fixture(scope="module")
def riders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("riders") / "riders.mp4"
    write_riders_clip(path, gop=30)
    return path


@pytest.fixture(scope="module")
def job_env(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory,
            nanodet: NanoDetDetector) -> dict[str, str]:
    """What workers and the API share: Redis, the queue, the jobs folder (``nanodet``: skip without weights)."""
    return {"DITEPOSE_REDIS_URL": redis_server.url, "DITEPOSE_JOBS_DIR": str(tmp_path_factory.mktemp("jobs")),
            "DITEPOSE_JOB_QUEUE": f"video-{uuid.uuid4().hex[:8]}", "DITEPOSE_TORCH_THREADS": "1", **FAST_RECOVERY}


def _service(env: dict[str, str], demo_checkpoint: Path, segment_s: float, videos: dict[str, Path]) -> JobService:
    return JobService(Settings(
        _env_file=None, models=[ModelSpec(name="demo", checkpoint=demo_checkpoint)], redis_url=env["DITEPOSE_REDIS_URL"],
        jobs_dir=Path(env["DITEPOSE_JOBS_DIR"]), job_queue=env["DITEPOSE_JOB_QUEUE"], video_segment_s=segment_s,
        lock_ttl_s=3.0, visibility_timeout_s=5, videos=videos, grpc_enabled=False))


@pytest.fixture(scope="module")
def services(job_env: dict[str, str], demo_checkpoint: Path, riders: Path) -> Iterator[dict[int, JobService]]:
    """The API's job service cutting the clip into 3 segments, and one keeping it whole."""
    out = {n: _service(job_env, demo_checkpoint, s, {"riders": riders}) for n, s in ((SEGMENTS, 1.0), (1, 60.0))}
    yield out
    for svc in out.values():
        svc.close()


@pytest.fixture(scope="module")
def workers(job_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    logs = tmp_path_factory.mktemp("workers")
    procs = [WorkerProcess(job_env, logs / f"worker{i}.log") for i in (1, 2)]
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="module")
def store(redis_server: RedisServer) -> Iterator[RedisJobStore]:
    s = RedisJobStore(redis_server.url)
    yield s
    s.close()


def _finish(service: JobService, job_id: str, timeout: float = 600) -> JobRecord:
    def done() -> JobRecord | None:
        rec = service.get(job_id)
        return rec if rec is not None and rec.state in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout=timeout, interval=0.2, what=f"video job {job_id} to finish")


def _segments(store: RedisJobStore, job_id: str, count: int = SEGMENTS) -> list[JobRecord]:
    recs = store.get_many([shard_id(job_id, i) for i in range(count)])
    assert all(r is not None for r in recs)
    return recs  # type: ignore[return-value]


def _result(rec: JobRecord) -> dict[str, Any]:
    return json.loads((Path(VideoPlan.from_dict(rec.plan).folder) / RESULT_FILES["json"]).read_text())


def _assert_same_tracks(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Same ids on the same frames, boxes and keypoints to 1e-6."""
    assert [(t["track_id"], t["frames"]) for t in a["tracks"]] == [(t["track_id"], t["frames"]) for t in b["tracks"]]
    for ta, tb in zip(a["tracks"], b["tracks"], strict=True):
        np.testing.assert_allclose(np.array(ta["keypoints"]), np.array(tb["keypoints"]), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.array(ta["boxes"]), np.array(tb["boxes"]), rtol=0, atol=1e-6)
        assert ta["box_source"] == tb["box_source"]


@pytest.fixture(scope="module")
def whole(services: dict[int, JobService], workers: list[WorkerProcess]) -> JobRecord:
    """The clip as one segment: the reference the sharded runs must equal."""
    rec = _finish(services[1], services[1].submit_video(OPTIONS, catalogue="riders").id)
    assert rec.state == "succeeded", (rec.error, workers[0].log()[-3000:], workers[1].log()[-3000:])
    return rec


def test_three_segments_on_two_workers_equal_one_segment(
    services: dict[int, JobService], workers: list[WorkerProcess], store: RedisJobStore, whole: JobRecord
) -> None:
    rec = services[SEGMENTS].submit_video(OPTIONS, catalogue="riders")
    assert rec.shards == SEGMENTS and VideoPlan.from_dict(rec.plan).segments == [[0, 0, 30], [22, 30, 60],
                                                                                   [52, 60, 90]]
    done = _finish(services[SEGMENTS], rec.id)
    assert done.state == "succeeded", (done.error, workers[0].log()[-3000:])
    assert done.frames_done == 90 and done.progress == 100.0 and whole.shards == 1
    sharded, single = _result(done), _result(whole)
    assert len(sharded["tracks"]) == len(single["tracks"]) == 2  # two riders, one id each through the cuts
    assert all(len(t["frames"]) == 90 for t in sharded["tracks"])
    _assert_same_tracks(sharded, single)
    segs = _segments(store, rec.id)
    assert all(r.state == "succeeded" and r.attempts == 1 for r in segs)
    ran_on = {r.worker for r in [*segs, *_segments(store, whole.id, 1)]}
    assert len(ran_on) == 2, ran_on  # both workers took part
    assert store.get(merge_id(rec.id)).state == "succeeded"  # type: ignore[union-attr]
    listed = [j.id for j in services[SEGMENTS].recent()]
    assert rec.id in listed and not any("-s0" in j or "-merge" in j for j in listed)


def test_sigkill_of_a_worker_mid_segment_redoes_only_that_segment(
    job_env: dict[str, str], demo_checkpoint: Path, riders: Path, store: RedisJobStore, whole: JobRecord,
    tmp_path: Path,
) -> None:
    env = dict(job_env, DITEPOSE_JOB_QUEUE=f"kill-{uuid.uuid4().hex[:8]}")
    first, second = (WorkerProcess(env, tmp_path / f"worker{i}.log") for i in (1, 2))
    service = _service(env, demo_checkpoint, 1.0, {"riders": riders})
    try:
        rec = service.submit_video(OPTIONS, catalogue="riders")

        def both_busy() -> list[JobRecord] | None:
            live = [r for r in _segments(store, rec.id) if r.state == "running" and r.progress > 0]
            return live if len({r.worker for r in live}) == 2 else None

        wait_for(both_busy, timeout=300, interval=0.05, what="a segment under way on each worker")
        children = Path(f"/proc/{first.proc.pid}/task/{first.proc.pid}/children").read_text().split()
        assert len(children) == 1, children  # --concurrency 1: one pool child, which names the lease
        victim = f":{children[0]}"
        first.kill()
        killed = [r for r in _segments(store, rec.id) if r.state == "running" and str(r.worker).endswith(victim)]
        assert len(killed) == 1, killed
        done = _finish(service, rec.id)
        assert done.state == "succeeded", (done.error, second.log()[-3000:])
        segs = _segments(store, rec.id)
        redone = [r for r in segs if r.attempts > 1]
        assert [r.id for r in redone] == [killed[0].id], [(r.id, r.attempts, r.worker) for r in segs]
        assert redone[0].attempts == 2 and not str(redone[0].worker).endswith(victim)  # finished by worker 2
        assert all(r.state == "succeeded" for r in segs)
        _assert_same_tracks(_result(done), _result(whole))
    finally:
        first.kill()
        second.stop()
        service.close()


def test_cancel_mid_job_stops_the_remaining_segments(
    services: dict[int, JobService], workers: list[WorkerProcess], store: RedisJobStore
) -> None:
    service = services[SEGMENTS]
    job_id = service.submit_video(VideoJobOptions(flip_test=True, detect_interval=1), catalogue="riders").id
    wait_for(lambda: (r := service.get(job_id)) is not None and (r.frames_done or 0) > 0, timeout=300,
             interval=0.05, what="the video job to be under way")
    cancelled = service.cancel(job_id)
    assert cancelled is not None and cancelled.cancel_requested
    done = _finish(service, job_id, timeout=120)
    assert done.state == "cancelled" and (done.frames_done or 0) < 90
    segs = _segments(store, job_id)
    states = [r.state for r in segs]
    assert "running" not in states and "queued" not in states and "succeeded" not in states, states
    assert any(r.attempts == 0 for r in segs)  # the third segment never started
    assert not (Path(VideoPlan.from_dict(done.plan).folder) / RESULT_FILES["json"]).exists()
    time.sleep(2.0)  # revoked or redelivered copies reach the workers: none runs a segment again
    assert [(r.state, r.attempts) for r in _segments(store, job_id)] == [(r.state, r.attempts) for r in segs]
    assert store.get(merge_id(job_id)).attempts == 0  # type: ignore[union-attr]
