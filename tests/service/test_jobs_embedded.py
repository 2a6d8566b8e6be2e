"""Embedded mode (no Redis): the shared task body on the API's thread executor."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from service.jobs.config import JobSettings
from service.jobs.evaluation import predictions_path, run_job
from service.jobs.manager import JobService, UnknownModel
from service.jobs.metrics import JobMetrics
from service.jobs.records import JobRecord, LocalJobStore
from service.jobs.schemas import EvaluateRequest
from tests.service import jobs_support
from tests.service.jobs_support import TinyEval, direct_evaluation, wait_for

one_torch_thread = jobs_support.one_torch_thread  # fixtures
tiny_eval = jobs_support.tiny_eval

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _service(tiny: TinyEval, tmp_path: Path, **overrides: object) -> JobService:
    settings = JobSettings(redis_url=None, datasets=tiny.datasets(), checkpoint_dir=tiny.checkpoint_dir,
                           jobs_dir=tmp_path / "jobs", **overrides)
    return JobService(settings, served_models={}, metrics=JobMetrics())


def _finished(service: JobService, job_id: str) -> JobRecord | None:
    rec = service.get(job_id)
    return rec if rec is not None and rec.state in ("succeeded", "failed", "cancelled") else None


def test_embedded_job_matches_direct_evaluation(tiny_eval: TinyEval, tmp_path: Path) -> None:
    service = _service(tiny_eval, tmp_path)
    try:
        rec = service.submit(EvaluateRequest(dataset="tiny", checkpoint=tiny_eval.checkpoint, batch_size=2))
        assert service.mode == "embedded"
        done = wait_for(lambda: _finished(service, rec.id), timeout=120, what="the job to finish")
        assert done.state == "succeeded", done.error
        assert done.progress == 100.0 and done.attempts == 1
        expected, preds = direct_evaluation(tiny_eval, tiny_eval.ann_file)
        assert set(done.result["metrics"]) == set(expected)
        for name, value in expected.items():
            assert done.result["metrics"][name] == pytest.approx(value, abs=1e-9), name
        # same keypoints as `ditepose evaluate`'s predictions, person by person
        doc = json.loads(Path(done.predictions).read_text())
        assert Path(done.predictions) == predictions_path(tmp_path / "jobs", rec.id)
        mine = {p["id"]: np.asarray(p["keypoints"]) for img in doc["images"] for p in img["persons"]}
        assert len(mine) == len(preds) == done.result["num_persons"]
        for p in preds:
            np.testing.assert_allclose(mine[p["bbox_id"]], p["keypoints"], atol=1e-3)
        # a second delivery of the same job does not run it again
        finished_at = done.finished_at
        assert run_job(rec.id, service.store, tmp_path / "jobs") == "done"
        assert service.get(rec.id).finished_at == finished_at
        samples = {s.name: s.value for m in service.metrics.registry.collect() for s in m.samples}
        assert samples['ditepose_jobs_submitted_total'] == 1.0
    finally:
        service.close()


def test_bad_requests_fail_before_queueing(tiny_eval: TinyEval, tmp_path: Path) -> None:
    service = _service(tiny_eval, tmp_path)
    try:
        with pytest.raises(UnknownModel):
            service.submit(EvaluateRequest(dataset="tiny", model="nope"))
        with pytest.raises(UnknownModel):
            service.submit(EvaluateRequest(dataset="tiny", checkpoint="missing.pth"))
        with pytest.raises(ValueError):
            EvaluateRequest(dataset="tiny", model="a", checkpoint="b")
        assert service.recent() == []
    finally:
        service.close()


def test_det_boxes_without_det_file_fail_the_job(tiny_eval: TinyEval, tmp_path: Path) -> None:
    service = _service(tiny_eval, tmp_path)
    try:
        rec = service.submit(EvaluateRequest(dataset="tiny", checkpoint=tiny_eval.checkpoint, use_gt_boxes=False))
        done = wait_for(lambda: _finished(service, rec.id), timeout=60, what="the job to fail")
        assert done.state == "failed" and "det_file" in done.error
    finally:
        service.close()


class CancelAfterFirstBatch(LocalJobStore):
    """The real store, with a client's DELETE arriving right after the first batch."""

    def heartbeat(self, job_id: str, token: str, ttl_s: float, progress: float) -> tuple[bool, bool]:
        if progress > 0:
            self.request_cancel(job_id)
        return super().heartbeat(job_id, token, ttl_s, progress)


def test_running_job_stops_at_the_next_batch_when_cancelled(tiny_eval: TinyEval, tmp_path: Path) -> None:
    store = CancelAfterFirstBatch()
    rec = JobRecord(id=JobRecord.new_id(), plan={
        "model": {"name": "tiny", "checkpoint": str(tiny_eval.checkpoint_dir / tiny_eval.checkpoint)},
        "dataset": {"name": "tiny", **tiny_eval.datasets()["tiny"]},
        "options": {"flip_test": False, "decoder": "default", "use_gt_boxes": True, "batch_size": 1},
    })
    store.create(rec)
    metrics = JobMetrics()
    assert run_job(rec.id, store, tmp_path / "jobs", metrics=metrics) == "cancelled"
    got = store.get(rec.id)
    assert got.state == "cancelled" and 0 < got.progress < 100 and got.result is None
    assert not predictions_path(tmp_path / "jobs", rec.id).exists()
    samples = {(s.name, tuple(s.labels.items())): s.value for m in metrics.registry.collect() for s in m.samples}
    assert samples[("ditepose_jobs_finished_total", (("state", "cancelled"),))] == 1.0
    assert samples[("ditepose_jobs_running", ())] == 0.0


def test_queued_job_cancelled_never_runs(tiny_eval: TinyEval, tmp_path: Path) -> None:
    service = _service(tiny_eval, tmp_path)
    try:
        first = service.submit(EvaluateRequest(dataset="tiny", checkpoint=tiny_eval.checkpoint))
        second = service.submit(EvaluateRequest(dataset="tiny", checkpoint=tiny_eval.checkpoint))
        cancelled = service.cancel(second.id)  # one executor thread: still queued behind the first
        assert cancelled.state == "cancelled"
        wait_for(lambda: _finished(service, first.id), timeout=120, what="the first job")
        time.sleep(0.2)
        again = service.get(second.id)
        assert again.state == "cancelled" and again.attempts == 0 and again.started_at is None
    finally:
        service.close()
