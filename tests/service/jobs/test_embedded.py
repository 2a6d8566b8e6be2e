"""Embedded mode (no Redis): the shared task body on the API's thread executor."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.settings import DatasetSpec, Settings
from ditepose.service.jobs.evaluation import run_job
from ditepose.service.jobs.manager import JobService, UnknownModel
from ditepose.service.jobs.metrics import JobMetrics
from ditepose.service.jobs.records import JobRecord, LocalJobStore
from ditepose.service.jobs.runs import predictions_path
from ditepose.service.jobs.schemas import EvaluateRequest
from tests.service.jobs.support import TinyEval, direct_evaluation, tiny_plan, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _service(tiny: TinyEval, tmp_path: Path, pool: WorkerPool, **overrides: object) -> JobService:
    settings = Settings(_env_file=None, redis_url=None, datasets=tiny.datasets(), checkpoint_dir=tiny.checkpoint_dir,
                        jobs_dir=tmp_path / "jobs", **overrides)
    return JobService(settings, lambda: pool, metrics=JobMetrics())


def _finished(service: JobService, job_id: str) -> JobRecord | None:
    rec = service.get(job_id)
    return rec if rec is not None and rec.state in ("succeeded", "failed", "cancelled") else None


def test_embedded_job_matches_direct_evaluation(tiny_eval: TinyEval, tmp_path: Path, job_pool: WorkerPool) -> None:
    service = _service(tiny_eval, tmp_path, job_pool)
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
        assert run_job(rec.id, service.store, job_pool, tmp_path / "jobs") == "done"
        assert service.get(rec.id).finished_at == finished_at
        samples = {s.name: s.value for m in service.metrics.registry.collect() for s in m.samples}
        assert samples['ditepose_jobs_submitted_total'] == 1.0
    finally:
        service.close()


def test_bad_requests_fail_before_queueing(tiny_eval: TinyEval, tmp_path: Path, job_pool: WorkerPool) -> None:
    service = _service(tiny_eval, tmp_path, job_pool)
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


def test_det_boxes_without_det_file_fail_the_job(tiny_eval: TinyEval, tmp_path: Path, job_pool: WorkerPool) -> None:
    service = _service(tiny_eval, tmp_path, job_pool)
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


def test_running_job_stops_at_the_next_batch_when_cancelled(tiny_eval: TinyEval, tmp_path: Path, job_pool: WorkerPool) -> None:
    store = CancelAfterFirstBatch()
    rec = JobRecord(id=JobRecord.new_id(), plan=tiny_plan(tiny_eval, flip_test=False, batch_size=1))
    store.create(rec)
    metrics = JobMetrics()
    assert run_job(rec.id, store, job_pool, tmp_path / "jobs", metrics=metrics) == "cancelled"
    got = store.get(rec.id)
    assert got.state == "cancelled" and 0 < got.progress < 100 and got.result is None
    assert not predictions_path(tmp_path / "jobs", rec.id).exists()
    samples = {(s.name, tuple(s.labels.items())): s.value for m in metrics.registry.collect() for s in m.samples}
    assert samples[("ditepose_jobs_finished_total", (("state", "cancelled"),))] == 1.0
    assert samples[("ditepose_jobs_running", ())] == 0.0


def test_queued_job_cancelled_never_runs(tiny_eval: TinyEval, tmp_path: Path, job_pool: WorkerPool) -> None:
    service = _service(tiny_eval, tmp_path, job_pool)
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


def _tiny_mpii(tiny: TinyEval, root: Path) -> dict[str, str]:
    """An mmpose-format MPII set on coco-mini photos: person centres/scales from COCO boxes, joints spread
    over each box, head boxes as large as the person (so PCKh is far from 0 even for random weights)."""
    import torch

    from ditepose import model as models
    from ditepose.training.mpii_eval import save_mpii_gt

    ann = json.loads(tiny.ann_file.read_text())
    files = {i["id"]: i["file_name"] for i in ann["images"]}
    rng = np.random.default_rng(0)
    entries, joints0, heads = [], [], []
    for a in ann["annotations"]:
        if a.get("num_keypoints", 0) == 0 or a["bbox"][3] < 40:
            continue
        x, y, w, h = a["bbox"]
        joints = np.stack([x + rng.random(16) * w, y + rng.random(16) * h], axis=1)
        entries.append({"image": files[a["image_id"]], "center": [x + w / 2 + 1, y + h / 2 + 1],
                        "scale": h / 200, "joints": (joints + 1).tolist(), "joints_vis": [1] * 16})
        joints0.append(joints)
        heads.append([[x, y], [x + w, y + h]])
    (root / "mpii.json").write_text(json.dumps(entries))
    save_mpii_gt(root / "mpii_gt.json", np.array(joints0), np.ones((len(entries), 16)), np.array(heads))
    torch.manual_seed(1)
    net = models.build_model("dite_hrnet_18", num_joints=16)
    models.save_checkpoint(root / "mpii.pth", net, models.CheckpointMeta("dite_hrnet_18", "mpii", 16, input_size=(64, 64)))
    return {"format": "mpii", "ann_file": str(root / "mpii.json"), "img_dir": str(tiny.img_dir),
            "gt_file": str(root / "mpii_gt.json")}


def test_mpii_job_matches_direct_pckh(tiny_eval: TinyEval, tmp_path: Path, job_pool: WorkerPool) -> None:
    from ditepose import model as models
    from ditepose.model.pipeline import module_infer
    from ditepose.training.datasets import MpiiKeypointDataset
    from ditepose.training.evaluate import pipeline_for, predict, score

    dataset = _tiny_mpii(tiny_eval, tmp_path)
    store = LocalJobStore()
    rec = JobRecord(id=JobRecord.new_id(), plan=tiny_plan(tiny_eval, tmp_path / "mpii.pth", dataset, "mpii",
                                                          batch_size=4))
    store.create(rec)
    assert run_job(rec.id, store, job_pool, tmp_path / "jobs") == "succeeded", store.get(rec.id).error
    got = store.get(rec.id).result["metrics"]
    module, _ = models.load_pose_model(tmp_path / "mpii.pth")
    ds = MpiiKeypointDataset(dataset["ann_file"], dataset["img_dir"], (64, 64), train=False)
    expected = score(ds, predict(module_infer(module), ds, pipeline_for(ds), batch_size=4), mpii_gt=dataset["gt_file"])
    assert set(got) == {"Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "PCKh", "PCKh@0.1"}
    assert expected["PCKh"] > 0
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name


def test_soft_time_limit_and_attempt_limit_fail_the_job(tiny_eval: TinyEval, tmp_path: Path, job_pool: WorkerPool) -> None:
    plan = tiny_plan(tiny_eval, flip_test=False, batch_size=1)
    store = LocalJobStore()
    slow = JobRecord(id=JobRecord.new_id(), plan=plan)
    store.create(slow)
    assert run_job(slow.id, store, job_pool, tmp_path, soft_time_limit_s=1e-6) == "failed"
    assert "soft time limit" in store.get(slow.id).error
    doomed = JobRecord(id=JobRecord.new_id(), plan=plan, attempts=3)  # three workers died on it already
    store.create(doomed)
    assert run_job(doomed.id, store, job_pool, tmp_path, max_attempts=3) == "failed"
    assert "gave up after 3 attempts" in store.get(doomed.id).error


def test_embedded_mode_through_the_api(tiny_eval: TinyEval, tmp_path: Path, reference_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from ditepose.service.core.settings import ModelSpec
    from tests.service.conftest import start_server

    monkeypatch.delenv("DITEPOSE_REDIS_URL", raising=False)
    for key, value in tiny_eval.env(tmp_path / "jobs").items():
        monkeypatch.setenv(key, value)
    models = [ModelSpec(name="hrnet18", checkpoint=reference_dir / "dite_hrnet_18_coco_random.pth")]
    with start_server(models=models) as live, live.client() as client:
        assert client.get("/readyz").json()["jobs"] == {"mode": "embedded", "ready": True}
        response = client.post("/v1/evaluate", json={"dataset": "tiny", "checkpoint": "tiny"})
        assert response.status_code == 202, response.text
        location = response.headers["Location"]
        body = wait_for(lambda: (b := client.get(location).json())["state"] in ("succeeded", "failed") and b,
                        timeout=120, what="the embedded job")
        assert body["state"] == "succeeded", body
        expected, _ = direct_evaluation(tiny_eval, tiny_eval.ann_file)
        assert body["metrics"] == pytest.approx(expected, abs=1e-9)
        assert client.get(body["predictions_url"]).json()["job_id"] == body["id"]
        scrape = client.get("/metrics").text
        assert 'ditepose_jobs_finished_total{state="succeeded"} 1.0' in scrape
        assert 'ditepose_job_duration_seconds_count{state="succeeded"} 1.0' in scrape
        assert "ditepose_jobs_running 0.0" in scrape


def test_closing_the_embedded_executor_cancels_unfinished_jobs(tiny_eval: TinyEval, tmp_path: Path, job_pool: WorkerPool) -> None:
    service = _service(tiny_eval, tmp_path, job_pool)
    slow = EvaluateRequest(dataset="coco-mini-val", checkpoint=tiny_eval.checkpoint, batch_size=1)
    running, queued = service.submit(slow), service.submit(slow)
    wait_for(lambda: service.get(running.id).state == "running", timeout=60, what="the first job to start")
    service.executor.close()
    assert service.get(queued.id).state == "cancelled"
    done = wait_for(lambda: _finished(service, running.id), timeout=60, what="the running job to stop")
    assert done.state == "cancelled" and done.progress < 100
    service.store.close()


def test_max_images_scores_a_subset_like_training_does(tiny_eval: TinyEval, tmp_path: Path, job_pool: WorkerPool) -> None:
    from ditepose.service.jobs.manager import InvalidRequest

    service = _service(tiny_eval, tmp_path, job_pool)
    try:
        rec = service.submit(EvaluateRequest(dataset="coco-mini-val", checkpoint=tiny_eval.checkpoint,
                                             max_images=2, flip_test=True))
        done = wait_for(lambda: _finished(service, rec.id), timeout=120, what="the subset job")
        assert done.state == "succeeded", done.error
        assert done.result["num_images"] == 2
        expected, preds = direct_evaluation(tiny_eval, tiny_eval.full_ann_file, max_people=done.result["num_persons"])
        assert len(preds) == done.result["num_persons"]
        assert done.result["metrics"] == pytest.approx(expected, abs=1e-9)
        service.catalogue._datasets["mpii"] = DatasetSpec(format="mpii", ann_file=tmp_path / "a.json",
                                                           img_dir=tmp_path, gt_file=tmp_path / "gt.json")
        with pytest.raises(InvalidRequest, match="COCO"):
            service.submit(EvaluateRequest(dataset="mpii", checkpoint=tiny_eval.checkpoint, max_images=1))
    finally:
        service.close()


def test_builtin_demo_dataset_is_offered_and_evaluates(tiny_eval: TinyEval, tmp_path: Path, job_pool: WorkerPool) -> None:
    """With no catalogue at all, 'demo-synthetic' still works, so the README's example runs as pasted."""
    service = _service(tiny_eval, tmp_path, job_pool)
    try:
        assert "demo-synthetic" in service.catalogue.dataset_names()
        spec = service.catalogue.dataset("demo-synthetic").spec
        people = [a for a in json.loads(spec.ann_file.read_text())["annotations"] if a["num_keypoints"] > 0]
        rec = service.submit(EvaluateRequest(dataset="demo-synthetic", checkpoint=tiny_eval.checkpoint, batch_size=4))
        done = wait_for(lambda: _finished(service, rec.id), timeout=120, what="the demo job")
        assert done.state == "succeeded", done.error
        assert done.result["num_persons"] == len(people) > 0
        assert set(done.result["metrics"]) >= {"AP", "AP50", "AP75", "AR"}
    finally:
        service.executor.close()
        service.store.close()
    off = _service(tiny_eval, tmp_path / "off", job_pool, demo_dataset=False)
    try:
        assert "demo-synthetic" not in off.catalogue.dataset_names()
    finally:
        off.executor.close()
        off.store.close()
