"""Evaluation jobs choose their person boxes (``boxes``: gt | detections | detector), as ``ditepose evaluate``.

On the tiny set (3 coco-mini val images) with the tiny checkpoint: a boxes='detector' job crops
NanoDet's boxes (run as background work on the job's pool) and reports the detector beside the AP;
a detections file of the exact GT boxes scores as GT; bad box options are 422s naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.settings import ModelSpec, Settings
from ditepose.service.jobs.manager import InvalidRequest, JobService
from ditepose.service.jobs.metrics import JobMetrics
from ditepose.service.jobs.plan import JobPlan
from ditepose.service.jobs.records import JobRecord
from ditepose.service.jobs.schemas import EvaluateRequest
from tests.service.conftest import assert_error, start_server
from tests.service.jobs.support import (
    RedisServer,
    TinyEval,
    WorkerProcess,
    direct_evaluation,
    tiny_plan,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def datasets(tiny_eval: TinyEval, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """The tiny catalogue plus the tiny set with a detections file of its exact GT boxes, and an MPII entry."""
    from ditepose.training.datasets import CocoKeypointDataset

    root = tmp_path_factory.mktemp("box_sets")
    gt = CocoKeypointDataset(tiny_eval.ann_file, tiny_eval.img_dir, train=False)
    dets = [{"image_id": r["image_id"], "bbox": r["bbox"], "score": 1.0, "category_id": 1} for r in gt.records]
    (root / "dets.json").write_text(json.dumps(dets))
    out = dict(tiny_eval.datasets())
    out["tiny-dets"] = dict(out["tiny"], det_file=str(root / "dets.json"))
    out["mpii-x"] = {"format": "mpii", "ann_file": str(root / "mpii.json"), "img_dir": str(root),
                     "gt_file": str(root / "mpii_gt.json")}
    return out


def _service(tiny: TinyEval, datasets: dict[str, Any], tmp_path: Path, pool: WorkerPool) -> JobService:
    settings = Settings(_env_file=None, redis_url=None, datasets=datasets, checkpoint_dir=tiny.checkpoint_dir,
                        jobs_dir=tmp_path / "jobs")
    return JobService(settings, lambda: pool, metrics=JobMetrics())


def _run(service: JobService, **request: Any) -> JobRecord:
    rec = service.submit(EvaluateRequest(**request))
    return wait_for(lambda: (r := service.get(rec.id)) and r.state in ("succeeded", "failed", "cancelled") and r,
                    timeout=180, what="the job to finish")


def _direct(tiny: TinyEval, boxes: Any) -> tuple[dict[str, float], Any]:
    """What ``ditepose evaluate --boxes ...`` computes for the tiny checkpoint on the tiny set (no flip)."""
    from ditepose import model as models
    from ditepose.model.pipeline import module_infer
    from ditepose.training.boxes import evaluation_set
    from ditepose.training.evaluate import pipeline_for, predict, score

    module, meta = models.load_pose_model(tiny.checkpoint_dir / tiny.checkpoint)
    ev = evaluation_set("coco", tiny.ann_file, tiny.img_dir, tuple(meta.input_size), boxes)
    preds = predict(module_infer(module), ev.dataset, pipeline_for(ev.dataset, flip_test=False), batch_size=8)
    return score(ev.dataset, preds), ev


def test_detector_job_crops_nanodet_boxes_on_the_pool_and_reports_the_detector(
        tiny_eval: TinyEval, datasets: dict[str, Any], tmp_path: Path, job_pool: WorkerPool, nanodet: Any) -> None:
    from ditepose.training.boxes import BoxSource
    from ditepose.training.datasets import read_rgb

    service = _service(tiny_eval, datasets, tmp_path, job_pool)
    try:
        done = _run(service, dataset="tiny", checkpoint=tiny_eval.checkpoint, boxes="detector", flip_test=False)
    finally:
        service.close()
    assert done.state == "succeeded", done.error
    result = done.result
    assert result["boxes"] == "detector:nanodet"
    assert result["box_source"] == {"source": "detector", "detector": "nanodet", "score_thr": 0.3}
    assert job_pool.detector_batcher("nanodet") is not None  # detection ran as batches on the job's pool
    # the persons evaluated are NanoDet's detections on the 3 images, with their scores as box scores
    ann = json.loads(tiny_eval.ann_file.read_text())
    found = {i["id"]: nanodet.detect(read_rgb(tiny_eval.img_dir / i["file_name"])) for i in ann["images"]}
    detections = sum(len(scores) for _, scores in found.values())
    assert result["num_persons"] == detections == result["detector_report"]["detections"]
    assert result["detector_report"]["images"] == 3
    doc = json.loads(Path(done.predictions).read_text())
    assert doc["box_source"] == result["box_source"]
    for image in doc["images"]:
        got = sorted(p["box_score"] for p in image["persons"])
        assert got == pytest.approx(sorted(float(s) for s in found[image["image_id"]][1]), abs=1e-6)
    # ... and the numbers are `ditepose evaluate --boxes detector`'s
    expected, direct = _direct(tiny_eval, BoxSource("detector"))
    assert result["metrics"] == pytest.approx(expected, abs=1e-9)
    assert result["detector_report"]["found"] == direct.detector_report["found"]


def test_detections_job_of_exact_gt_boxes_scores_as_gt(tiny_eval: TinyEval, datasets: dict[str, Any],
                                                       tmp_path: Path, job_pool: WorkerPool) -> None:
    service = _service(tiny_eval, datasets, tmp_path, job_pool)
    try:
        gt = _run(service, dataset="tiny", checkpoint=tiny_eval.checkpoint, flip_test=False)
        dets = _run(service, dataset="tiny-dets", checkpoint=tiny_eval.checkpoint, flip_test=False,
                    boxes="detections")
        with pytest.raises(InvalidRequest, match="boxes 'detections' needs a dataset with a det_file"):
            service.submit(EvaluateRequest(dataset="tiny", checkpoint=tiny_eval.checkpoint, boxes="detections"))
        with pytest.raises(InvalidRequest, match="MPII"):
            service.submit(EvaluateRequest(dataset="mpii-x", checkpoint=tiny_eval.checkpoint, boxes="detector"))
    finally:
        service.close()
    assert gt.state == dets.state == "succeeded", (gt.error, dets.error)
    assert gt.result["box_source"] == {"source": "gt"} and gt.result["boxes"] == "gt"
    assert dets.result["box_source"] == {"source": "detections", "file": datasets["tiny-dets"]["det_file"],
                                         "det_bbox_thr": 0.0}
    assert dets.result["num_persons"] == gt.result["num_persons"] > 0
    assert dets.result["metrics"] == pytest.approx(gt.result["metrics"], abs=1e-12)
    expected, _ = direct_evaluation(tiny_eval, tiny_eval.ann_file)  # with flip: a different number
    assert set(expected) == set(gt.result["metrics"])


def test_plans_stored_before_boxes_still_run(tiny_eval: TinyEval) -> None:
    plan = tiny_plan(tiny_eval)
    del plan["options"]["boxes"]
    plan["options"]["use_gt_boxes"] = False
    assert JobPlan.from_dict(plan).options.boxes == "detections"
    plan["options"]["use_gt_boxes"] = True
    assert JobPlan.from_dict(plan).options.boxes == "gt"


def test_bad_box_options_are_422_naming_the_field(tiny_eval: TinyEval, datasets: dict[str, Any],
                                                  tmp_path: Path) -> None:
    model = ModelSpec(name="tiny", checkpoint=tiny_eval.checkpoint_dir / tiny_eval.checkpoint)
    with start_server(models=[model], redis_url=None, datasets=datasets, checkpoint_dir=tiny_eval.checkpoint_dir,
                      jobs_dir=tmp_path / "jobs") as live, live.client() as client:
        base = {"dataset": "tiny", "checkpoint": tiny_eval.checkpoint}
        cases = [
            ({"boxes": "sideways"}, "boxes"),
            ({"boxes": "detections"}, "det_file"),
            ({"boxes": "detector", "detector": "nope"}, "detector"),
            ({"boxes": "gt", "detector": "hog"}, "detector"),
            ({"boxes": "gt", "det_score_thr": 0.5}, "det_score_thr"),
            ({"boxes": "detector", "det_score_thr": -1}, "det_score_thr"),
            ({"boxes": "detector", "detector": "whole", "det_score_thr": 0.5}, "det_score_thr"),
            ({"boxes": "gt", "use_gt_boxes": False}, "use_gt_boxes"),
            ({"dataset": "mpii-x", "boxes": "detector"}, "MPII"),
        ]
        for extra, field in cases:
            body = assert_error(client.post("/v1/evaluate", json={**base, **extra}), 422, "invalid_request")
            assert field in body["error"]["message"], (extra, body)
        # a good one: the job's response carries the boxes it used and the detector's report
        response = client.post("/v1/evaluate", json={**base, "boxes": "detector", "flip_test": False})
        assert response.status_code == 202, response.text
        body = wait_for(lambda: (b := client.get(response.headers["Location"]).json())["state"]
                        in ("succeeded", "failed") and b, timeout=180, what="the detector job")
        assert body["state"] == "succeeded", body
        assert body["box_source"]["source"] == "detector" and body["boxes"] == "detector:nanodet"
        assert body["detector_report"]["images"] == 3 and body["num_persons"] == body["detector_report"]["detections"]
        assert body["request"]["boxes"] == "detector"


def test_detector_job_on_a_celery_worker(tiny_eval: TinyEval, datasets: dict[str, Any], redis_server: RedisServer,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nanodet: Any) -> None:
    """The Celery path runs the same task body: a ``ditepose worker`` process, its own pool, NanoDet's boxes."""
    import uuid

    env = tiny_eval.env(tmp_path / "jobs", redis_server.url, DITEPOSE_JOB_QUEUE=f"boxes-{uuid.uuid4().hex[:8]}",
                        DITEPOSE_DATASETS=json.dumps(datasets))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        model = ModelSpec(name="tiny", checkpoint=tiny_eval.checkpoint_dir / tiny_eval.checkpoint)
        with start_server(models=[model], redis_url=redis_server.url) as live, live.client() as client:
            response = client.post("/v1/evaluate", json={"dataset": "tiny-dets", "checkpoint": tiny_eval.checkpoint,
                                                         "boxes": "detector", "flip_test": False})
            assert response.status_code == 202, response.text
            body = wait_for(lambda: (b := client.get(response.headers["Location"]).json())["state"]
                            in ("succeeded", "failed") and b, timeout=300, interval=0.2, what="the worker's job")
            assert body["state"] == "succeeded", (body, worker.log()[-3000:])
            assert body["worker"] and body["box_source"]["detector"] == "nanodet"
            assert body["num_persons"] == body["detector_report"]["detections"] > 0
    finally:
        worker.stop()
