"""docker-compose.yml's redis, api and worker started for real without Docker: a pose and a job through them.

The processes, their flags and their DITEPOSE_* environment come from the compose file (see
tests/deploy/stack_support.py); /models, /data, the catalogue and the secret map to folders here.
The dataset is the shipped catalogue's ``coco-val`` entry, with /data holding three coco-mini images.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ditepose.cli import build_parser
from tests.conftest import REPO_ROOT
from tests.deploy.compose_support import (
    DASHBOARD_FILE,
    DATASETS_TARGET,
    PROMETHEUS_FILE,
    bind_source,
    compose,
    load_yaml,
    services,
)
from tests.deploy.stack_support import Mounts, Stack, wait_for


def _has_worker_command() -> bool:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return "worker" in action.choices  # type: ignore[operator]


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _has_worker_command(), reason="`ditepose worker` (the jobs branch) is not on this "
                       "branch yet: the compose stack cannot run without it"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]

COCO_IMAGE = "000000217285.jpg"
COCO_BOXES = [[261.96, 162.16, 107.47, 252.37], [510.82, 168.47, 73.07, 258.53]]


def _tiny_data(root: Path, coco_mini: Path) -> None:
    """/data as docker/datasets.json expects it, holding three coco-mini val images with people."""
    full = json.loads((coco_mini / "annotations" / "person_keypoints_val2017.json").read_text())
    keep = sorted({a["image_id"] for a in full["annotations"] if a.get("num_keypoints", 0) > 0})[:3]
    subset = dict(full, images=[i for i in full["images"] if i["id"] in keep],
                  annotations=[a for a in full["annotations"] if a["image_id"] in keep])
    ann = root / "coco" / "annotations" / "person_keypoints_val2017.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps(subset))
    (root / "coco" / "val2017").symlink_to(coco_mini / "val2017")


def _tiny_checkpoint(models_dir: Path) -> str:
    """An operator's checkpoint in /models, small input so the job is quick."""
    import torch

    from ditepose import model
    models_dir.mkdir(parents=True)
    torch.manual_seed(0)
    net = model.build_model("dite_hrnet_18", num_joints=17)
    meta = model.CheckpointMeta("dite_hrnet_18", "coco", 17, input_size=(64, 96))
    model.save_checkpoint(models_dir / "tiny.pth", net, meta)
    return "tiny.pth"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, coco_mini: Path) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("stack")
    _tiny_data(work / "data", coco_mini)
    _tiny_checkpoint(work / "models")
    named = {name: work / "volumes" / name for name in compose()["volumes"]}
    for path in named.values():
        path.mkdir(parents=True)
    # The catalogue is the shipped one; its /data paths point into the worker's /data mount.
    catalogue_source = bind_source(services()["worker"], DATASETS_TARGET)
    assert catalogue_source is not None
    catalogue = (REPO_ROOT / catalogue_source).read_text()
    (work / "datasets.json").write_text(catalogue.replace('"/data/', f'"{work / "data"}/'))
    mounts = Mounts(named, {"./models": work / "models", "./data": work / "data",
                            catalogue_source: work / "datasets.json"})
    # Only for this 2-core test box: one torch thread per process (api + worker + worker child).
    stack = Stack(work, mounts, extra_env={"DITEPOSE_TORCH_THREADS": "1"})
    try:
        stack.start()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
    for name, process in stack.processes.items():  # clean runs and clean (SIGTERM) shutdowns
        assert "Traceback" not in process.log_file.read_text(errors="replace"), f"{name}:\n{process.log()}"


@pytest.fixture(scope="module")
def api_key() -> str:
    secret = REPO_ROOT / compose()["secrets"]["api_key"]["file"]
    return secret.read_text().splitlines()[0].strip()


@pytest.fixture(scope="module")
def client(stack: Stack, api_key: str) -> Iterator[httpx.Client]:
    url = f"http://127.0.0.1:{stack.port('api', '--port')}"
    with httpx.Client(base_url=url, headers={"X-API-Key": api_key}, timeout=60) as c:
        yield c


def test_api_key_is_required(stack: Stack, client: httpx.Client) -> None:
    anonymous = httpx.get(f"{client.base_url}/v1/models", timeout=30)
    assert anonymous.status_code == 401, anonymous.text
    assert client.get("/v1/models").status_code == 200
    assert httpx.get(f"{client.base_url}/healthz", timeout=30).status_code == 200  # probes need no key


def test_pose_through_the_api(client: httpx.Client, coco_mini: Path) -> None:
    image = (coco_mini / "val2017" / COCO_IMAGE).read_bytes()
    response = client.post("/v1/pose", files={"image": ("a.jpg", image, "image/jpeg")},
                           data={"boxes": json.dumps(COCO_BOXES)})
    assert response.status_code == 200, response.text
    persons = response.json()["persons"]
    assert len(persons) == 2 and all(len(p["keypoints"]) == 17 for p in persons)


def _run_job(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/evaluate", json=body)
    assert response.status_code == 202, response.text
    location = response.headers["Location"]

    def finished() -> dict[str, Any] | None:
        job = client.get(location).json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(finished, 180, f"job {location}")


def test_evaluation_jobs_run_on_the_worker(stack: Stack, client: httpx.Client) -> None:
    started = time.monotonic()
    job = _run_job(client, {"dataset": "coco-val", "checkpoint": "tiny.pth", "batch_size": 8})
    assert job["state"] == "succeeded", (job, stack.logs())
    assert job["num_images"] == 3 and job["num_persons"] > 0
    assert set(job["metrics"]) >= {"AP", "AP50", "AR"}
    # Run by a process of the worker service (its prefork child), not by the API's embedded threads.
    pid = int(job["worker"].rsplit(":", 1)[1])
    assert os.getpgid(pid) == stack.processes["worker"].proc.pid
    predictions = client.get(job["predictions_url"])  # written by the worker, served by the api
    assert predictions.status_code == 200 and predictions.json()
    print(f"evaluation job on the worker: {time.monotonic() - started:.1f} s")
    # Served model (no checkpoint): the worker loads what the API serves.
    job = _run_job(client, {"dataset": "coco-val", "batch_size": 8, "flip_test": False})
    assert job["state"] == "succeeded", (job, stack.logs())
    # The built-in demo set works with nothing configured (made by the worker in the jobs volume).
    job = _run_job(client, {"dataset": "demo-synthetic", "checkpoint": "tiny.pth"})
    assert job["state"] == "succeeded", (job, stack.logs())
    # Redis persisted it: the append-only file is in the redis volume.
    assert list((stack.mounts.named_volumes["redis-data"]).rglob("*.aof*"))


def _scrape(url: str) -> dict[str, Any]:
    text = httpx.get(url, timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_prometheus_targets_serve_the_dashboard_metrics(stack: Stack, client: httpx.Client) -> None:
    """Every scrape target of prometheus.yml answers; together they carry every dashboard metric."""
    test_evaluation_jobs_ran = client.get("/v1/jobs").json()["jobs"]
    assert test_evaluation_jobs_ran, "run after the job test (module order)"
    config = load_yaml(PROMETHEUS_FILE)
    hosts = {"api": stack.container_port_map("api"), "worker": stack.container_port_map("worker")}
    series: set[str] = set()
    scraped = {}
    for job in config["scrape_configs"]:
        if job["job_name"] == "prometheus":
            continue
        targets = [t for c in job.get("static_configs", []) for t in c["targets"]]
        targets += [f"{n}:{c['port']}" for c in job.get("dns_sd_configs", []) for n in c["names"]]
        for target in targets:
            host, port = target.split(":")
            assert host in services()
            url = f"http://127.0.0.1:{hosts[host][int(port)]}{job.get('metrics_path', '/metrics')}"
            families = _scrape(url)
            scraped[host] = families
            series |= {s.name for f in families.values() for s in f.samples}
    assert set(scraped) == {"api", "worker"}
    finished = [s for s in scraped["worker"]["ditepose_jobs_finished"].samples
                if s.name.endswith("_total") and s.labels.get("state") == "succeeded"]
    assert finished and finished[0].value >= 1
    records = {s.labels["state"]: s.value for s in scraped["api"]["ditepose_job_records"].samples}
    assert records.get("succeeded", 0) >= 2
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b(ditepose_[a-z0-9_]+)\b", e)}
    # GPU series have no samples on a CPU box, and nothing was rejected or failed here.
    may_be_empty = {m for m in used if m.startswith("ditepose_gpu_memory")} | {
        "ditepose_batch_errors_total", "ditepose_jobs_submitted_total"}
    assert used - may_be_empty <= series, sorted(used - may_be_empty - series)


def test_grpc_serves_beside_rest(stack: Stack, api_key: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{stack.port('api', '--grpc-port')}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
