"""`docker compose up`, for real: the images built, the stack up, a pose, a stream, jobs, metrics, a crash.

docker-compose.yml is used as shipped, with one test override (written here) that only puts every
service on the host's network with free loopback ports (so no traffic leaves loopback), feeds the
build the host's package indexes, mounts coco-mini as /data/coco and a tiny checkpoint as /models,
and shortens health-check intervals and the job lease for a quick crash test. Grafana stays out
(it cannot be built here; its dashboard is validated in test_compose.py). Where redis or
Prometheus cannot be pulled, docker/build-base.sh builds local stand-ins under the official names
from Debian's packages; the report at the end of the run says which images are stand-ins.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.deploy.compose_support import (
    COMPOSE_FILE,
    PROMETHEUS_FILE,
    compose,
    healthcheck_argv,
    load_yaml,
    services,
)
from tests.deploy.docker_support import (
    LOOPBACK,
    Compose,
    build_args,
    build_base_images,
    docker_missing,
    existing_volumes,
    free_port,
    image_size_mb,
    served_indexes,
    standin_label,
    wait_for,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(2400)]

STACK = ("redis", "api", "worker", "prometheus")  # grafana: in the file, not in this test
PORT_FLAGS = ("--port", "--grpc-port", "--metrics-port")
HOST_FLAGS = ("--host", "--metrics-host")
COCO_IMAGE = "000000217285.jpg"
COCO_BOXES = [[261.96, 162.16, 107.47, 252.37], [510.82, 168.47, 73.07, 258.53]]
# A killed worker's task comes back within seconds (defaults: 1 h visibility, 30 s lease).
FAST_RECOVERY = {"DITEPOSE_VISIBILITY_TIMEOUT_S": "10", "DITEPOSE_LOCK_TTL_S": "4"}


@dataclass
class Ports:
    redis: int = field(default_factory=free_port)
    api: int = field(default_factory=free_port)
    grpc: int = field(default_factory=free_port)
    worker_metrics: int = field(default_factory=free_port)
    prometheus: int = field(default_factory=free_port)

    def of(self, service: str) -> dict[str, int]:
        """Port flag of the compose command -> the loopback port it gets here."""
        return {"api": {"--port": self.api, "--grpc-port": self.grpc},
                "worker": {"--metrics-port": self.worker_metrics}}.get(service, {})


def _command(service: str, ports: Ports) -> list[str]:
    """The compose command with its port flags on free ports and its bind addresses on loopback."""
    argv, out = [str(a) for a in services()[service]["command"]], []
    i = 0
    while i < len(argv):
        if argv[i] in PORT_FLAGS:
            out += [argv[i], str(ports.of(service)[argv[i]])]
            i += 2
        elif argv[i] in HOST_FLAGS:
            out += [argv[i], LOOPBACK]
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _healthcheck(service: str, ports: Ports) -> dict[str, Any]:
    """The compose healthcheck, pointed at this stack's ports, checked every 2 s."""
    argv = healthcheck_argv(services()[service])
    if service == "redis":
        argv = [argv[0], "-p", str(ports.redis), *argv[1:]]
    else:
        container_ports = {"api": {8000: ports.api}, "worker": {9100: ports.worker_metrics},
                           "prometheus": {9090: ports.prometheus}}[service]
        for container, host in container_ports.items():
            argv = [a.replace(f":{container}/", f":{host}/") for a in argv]
    return {"test": ["CMD", *argv], "interval": "2s", "timeout": "5s", "retries": 5}


def _prometheus_config(ports: Ports) -> dict[str, Any]:
    """docker/prometheus/prometheus.yml with its targets on loopback (no container DNS on the host network)."""
    config = load_yaml(PROMETHEUS_FILE)
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "2s"
    where = {"api:8000": f"{LOOPBACK}:{ports.api}", "127.0.0.1:9090": f"{LOOPBACK}:{ports.prometheus}"}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            static["targets"] = [where[t] for t in static["targets"]]
        for sd in job.pop("dns_sd_configs", []):
            assert sd["names"] == ["worker"] and sd["port"] == 9100, sd
            job.setdefault("static_configs", []).append({"targets": [f"{LOOPBACK}:{ports.worker_metrics}"]})
    return config


def _tiny_checkpoint(path: Path) -> None:
    """An operator's checkpoint in /models: Dite-HRNet-18 at 64x96, random weights (a quick job)."""
    import torch

    from ditepose import model

    torch.manual_seed(0)
    net = model.build_model("dite_hrnet_18", num_joints=17)
    model.save_checkpoint(path, net, model.CheckpointMeta("dite_hrnet_18", "coco", 17, input_size=(64, 96)))
    path.chmod(0o644)


def _override(work: Path, ports: Ports, args: dict[str, str], coco_mini: Path) -> dict[str, Any]:
    redis_url = f"redis://{LOOPBACK}:{ports.redis}/0"
    env = {"DITEPOSE_REDIS_URL": redis_url, "DITEPOSE_TORCH_THREADS": "1", **FAST_RECOVERY}
    build = {"network": "host", "args": args}
    return {"services": {
        "redis": {
            "network_mode": "host",
            "command": [*services()["redis"]["command"], "--port", str(ports.redis), "--bind", LOOPBACK],
            "healthcheck": _healthcheck("redis", ports),
        },
        "api": {
            "network_mode": "host", "build": build, "environment": env,
            "command": _command("api", ports), "healthcheck": _healthcheck("api", ports),
            "volumes": [f"{work / 'models'}:/models:ro"],
        },
        "worker": {
            "network_mode": "host", "build": build, "environment": env,
            "command": _command("worker", ports), "healthcheck": _healthcheck("worker", ports),
            "volumes": [f"{work / 'models'}:/models:ro", f"{work / 'data'}:/data:ro", f"{coco_mini}:/data/coco:ro"],
        },
        "prometheus": {
            "network_mode": "host",
            "command": [*services()["prometheus"]["command"], f"--web.listen-address={LOOPBACK}:{ports.prometheus}"],
            "healthcheck": _healthcheck("prometheus", ports),
            "volumes": [f"{work / 'prometheus.yml'}:/etc/prometheus/prometheus.yml:ro"],
        },
    }}


@dataclass
class Stack:
    compose: Compose
    ports: Ports
    api_key: str
    volumes: set[str] = field(default_factory=set)
    down: bool = False

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.api}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": self.api_key}, timeout=120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, coco_mini: Path, deploy_report: list[str]) -> Iterator[Stack]:
    reason = docker_missing()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("compose-up")
    for sub in ("models", "data/coco"):
        (work / sub).mkdir(parents=True)
    for path in (work, work / "models", work / "data", work / "data" / "coco"):
        path.chmod(0o755)  # the containers' user (uid 10001) reads the bind mounts
    _tiny_checkpoint(work / "models" / "tiny.pth")
    ports = Ports()
    (work / "prometheus.yml").write_text(yaml.safe_dump(_prometheus_config(ports)))
    (work / "prometheus.yml").chmod(0o644)

    started = time.monotonic()
    for line in build_base_images():
        deploy_report.append(line)
    deploy_report.append(f"base images ready in {time.monotonic() - started:.0f} s")
    for service in ("redis", "prometheus"):
        image = services()[service]["image"]
        label = standin_label(image)
        deploy_report.append(f"{service}: {image} is " + (f"a LOCAL STAND-IN ({label})" if label else "the official image"))

    project = f"ditepose-test-{uuid.uuid4().hex[:8]}"
    override = work / "docker-compose.test.yml"
    with served_indexes() as index_urls:
        args = build_args(index_urls)
        override.write_text(yaml.safe_dump(_override(work, ports, args, coco_mini), sort_keys=False))
        up = Compose(project, [COMPOSE_FILE, override])
        deploy_report.append(f"compose: {' '.join(up.argv[:1])} {up.version}; project {project}; build args {args}")
        for attempt in ("first", "second (warm: nothing changed)"):
            t0 = time.monotonic()
            up("build", "--force-rm", "api", "worker", timeout=1800)
            deploy_report.append(f"image build, {attempt}: {time.monotonic() - t0:.1f} s")
    image = services()["api"]["image"]
    deploy_report.append(f"image {image}: {image_size_mb(image):.0f} MB")

    key = (REPO_ROOT / compose()["secrets"]["api_key"]["file"]).read_text().splitlines()[0].strip()
    stack = Stack(up, ports, key)
    t0 = time.monotonic()
    try:
        up("up", "-d", *STACK, timeout=900)
        for service in STACK:
            wait_for(lambda s=service: stack.compose.health(s) == "healthy", 300, f"{service} to be healthy",
                     on_timeout=lambda: up.logs()[-6000:])
        deploy_report.append(f"stack ready (up -d until every service is healthy): {time.monotonic() - t0:.1f} s")
        stack.volumes = up.mounted_volumes()
        yield stack
    except BaseException:
        print(up.logs()[-20000:])
        raise
    finally:
        if not stack.down:
            up("down", "-v", "--remove-orphans", check=False, timeout=300)


# ---------------------------------------------------------------------------- the images
def test_images_run_as_non_root_with_the_weights_inside(stack: Stack) -> None:
    inspected = stack.compose.inspect("api")
    assert inspected["Config"]["User"] == "ditepose"
    assert inspected["Config"]["Healthcheck"]["Test"][:3] == ["CMD", "python", "-c"]  # the image's own
    status = stack.compose("exec", "-T", "api", "ditepose", "weights", "status").stdout
    assert "nanodet: ready" in status, status
    uid = stack.compose("exec", "-T", "worker", "id", "-u").stdout.strip()
    assert uid == "10001"


# ---------------------------------------------------------------------------- the api
def test_pose_of_a_coco_photo_over_rest(stack: Stack, coco_mini: Path, deploy_report: list[str]) -> None:
    image = (coco_mini / "val2017" / COCO_IMAGE).read_bytes()
    with stack.client() as client:
        assert httpx.get(f"{stack.url}/v1/models", timeout=30).status_code == 401  # the key is on
        models = client.get("/v1/models").json()
        assert models["models"][0]["demo_weights"] is False  # the demo checkpoint shipped in the image
        engines = models["models"][0]["engines"]  # the CPU image takes the fast path (OpenVINO, gate passed)
        assert {info["backend"] for info in engines.values()} == {"openvino"}, engines
        t0 = time.monotonic()
        response = client.post("/v1/pose", files={"image": (COCO_IMAGE, image, "image/jpeg")})
        first = time.monotonic() - t0
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["persons"], body  # no boxes given: the image's NanoDet found the people
        assert all(len(p["keypoints"]) == 17 for p in body["persons"])
        assert body["timings"]["detect_ms"] > 0
        with_boxes = client.post("/v1/pose", files={"image": (COCO_IMAGE, image, "image/jpeg")},
                                 data={"boxes": json.dumps(COCO_BOXES)})
        assert with_boxes.status_code == 200 and len(with_boxes.json()["persons"]) == 2
        t0 = time.monotonic()
        again = client.post("/v1/pose", files={"image": (COCO_IMAGE, image, "image/jpeg")})
        warm = time.monotonic() - t0
        assert again.status_code == 200, again.text
    served = ", ".join(f"{device} {info['backend']} {info['precision']}" for device, info in engines.items())
    deploy_report.append(f"engines in the api container: {served}")
    deploy_report.append(f"first pose (REST, no boxes, {len(body['persons'])} persons): {first:.2f} s "
                         f"(server timings {body['timings']}); the same again: {warm:.2f} s "
                         f"(server timings {again.json()['timings']})")


def test_stream_of_frames_over_grpc(stack: Stack, coco_mini: Path) -> None:
    import grpc

    from ditepose.proto.ditepose.v1 import pose_pb2, pose_pb2_grpc

    image = (coco_mini / "val2017" / COCO_IMAGE).read_bytes()
    frames = []
    for i in range(5):
        frame = pose_pb2.Frame(sequence_number=i, timestamp=i / 30, image=image)
        for x, y, w, h in COCO_BOXES:
            frame.boxes.add(x=x, y=y, width=w, height=h)
        frames.append(pose_pb2.StreamRequest(frame=frame))
    config = pose_pb2.StreamRequest(config=pose_pb2.StreamConfig(max_in_flight=2))
    with grpc.insecure_channel(f"{LOOPBACK}:{stack.ports.grpc}") as channel:
        stub = pose_pb2_grpc.PoseServiceStub(channel)
        results = list(stub.StreamPose(iter([config, *frames]), timeout=120,
                                       metadata=[("x-api-key", stack.api_key)]))
    assert [r.sequence_number for r in results] == list(range(5))
    for r in results:
        assert not r.HasField("error") and len(r.persons) == 2
        assert all(len(p.keypoints) == 17 for p in r.persons)


# ---------------------------------------------------------------------------- jobs on the worker
def _job(client: httpx.Client, location: str) -> dict[str, Any]:
    response = client.get(location)
    assert response.status_code == 200, response.text
    return response.json()


def _submit(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/v1/evaluate", json=body)
    assert response.status_code == 202, response.text
    return response.headers["Location"]


def _finished(client: httpx.Client, location: str, timeout: float) -> dict[str, Any]:
    return wait_for(lambda: (j := _job(client, location))["state"] in ("succeeded", "failed", "cancelled") and j,
                    timeout, f"job {location} to finish")


def _runs(logs: str, job_id: str) -> list[str]:
    """Celery's lines for completed runs of a job (a redelivery that finds it done returns 'done')."""
    return [line for line in logs.splitlines() if f"[{job_id}] succeeded" in line and line.endswith("'succeeded'")]


def test_evaluation_job_is_run_by_the_worker_container(stack: Stack, deploy_report: list[str]) -> None:
    with stack.client() as client:
        t0 = time.monotonic()
        location = _submit(client, {"dataset": "coco-val", "checkpoint": "tiny.pth", "batch_size": 8})
        job = _finished(client, location, 300)
        assert job["state"] == "succeeded", (job, stack.compose.logs("worker")[-4000:])
        assert job["num_images"] > 0 and job["num_persons"] > 0 and {"AP", "AR"} <= set(job["metrics"])
        predictions = client.get(job["predictions_url"])  # written by the worker, served by the api (jobs volume)
        assert predictions.status_code == 200 and predictions.json()
    # Celery's log line of the run is in the worker container's log (the api publishes, it does not run jobs).
    assert len(_runs(stack.compose.logs("worker"), job["id"])) == 1
    deploy_report.append(f"evaluation job on the worker container (coco-mini val, {job['num_images']} images, "
                         f"tiny 64x96 checkpoint): {time.monotonic() - t0:.1f} s")


def test_prometheus_scrapes_the_api_request_counter(stack: Stack) -> None:
    url = f"http://{LOOPBACK}:{stack.ports.prometheus}/api/v1/query"

    def query(expr: str) -> list[dict[str, Any]]:
        body = httpx.get(url, params={"query": expr}, timeout=30).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def pose_requests() -> float:
        result = query('sum(ditepose_http_requests_total{job="ditepose-api", route="/v1/pose", status="200"})')
        return float(result[0]["value"][1]) if result else 0.0

    wait_for(lambda: pose_requests() >= 2, 60, "Prometheus to scrape the api's POST /v1/pose count")
    up = {r["metric"]["job"]: r["value"][1] for r in query("up")}
    assert up == {"ditepose-api": "1", "ditepose-worker": "1", "prometheus": "1"}, up
    wait_for(lambda: query('sum(ditepose_jobs_finished_total{state="succeeded"})'), 60,
             "Prometheus to scrape the worker's finished-jobs counter")


def test_killed_worker_container_job_finishes_exactly_once(stack: Stack, deploy_report: list[str]) -> None:
    from ditepose.service.core.settings import Settings
    from ditepose.service.jobs.executor import CeleryExecutor

    with stack.client() as client:
        # The served model (the demo checkpoint, 256x192, flip test), one crop per batch: long enough to kill.
        location = _submit(client, {"dataset": "coco-val", "batch_size": 1})
        job_id = location.rsplit("/", 1)[1]
        wait_for(lambda: (j := _job(client, location))["state"] == "running" and j["progress"] > 5, 300,
                 "the job to be under way on the worker")
        t_kill = time.monotonic()
        stack.compose("kill", "worker")  # SIGKILL: no clean shutdown, the task stays unacknowledged
        stale = _job(client, location)
        assert stale["state"] == "running" and stale["progress"] < 100 and stale["attempts"] == 1, stale
        stack.compose("start", "worker")
        done = _finished(client, location, 600)
        assert done["state"] == "succeeded", (done, stack.compose.logs("worker")[-4000:])
        assert done["attempts"] == 2 and done["progress"] == 100.0, done
        deploy_report.append(f"killed worker: job finished {time.monotonic() - t_kill:.1f} s after the kill "
                             f"(attempts {done['attempts']})")
        listing = stack.compose("exec", "-T", "worker", "ls", "-A", f"/var/lib/ditepose/jobs/{job_id}").stdout.split()
        assert listing == ["predictions.json"], listing  # one predictions file, no temp files
        # One completed run in the worker container's log (both of its lives).
        assert len(_runs(stack.compose.logs("worker"), job_id)) == 1
        # The task delivered once more, from the host, by the api's own publisher: answered 'done'.
        executor = CeleryExecutor(Settings(_env_file=None, redis_url=f"redis://{LOOPBACK}:{stack.ports.redis}/0"))
        try:
            executor.submit(job_id)
        finally:
            executor.close()
        wait_for(lambda: any(f"[{job_id}] succeeded" in line and line.endswith("'done'")
                             for line in stack.compose.logs("worker").splitlines()), 60,
                 "the duplicate delivery to be answered 'done'")
        after = _job(client, location)
        assert (after["finished_at"], after["attempts"], after["metrics"]) == (
            done["finished_at"], 2, done["metrics"])
        assert len(_runs(stack.compose.logs("worker"), job_id)) == 1


def test_down_leaves_no_container_network_or_volume(stack: Stack) -> None:
    before = stack.compose.resources()
    assert len(before["containers"]) == len(STACK) and before["networks"] and stack.volumes
    stack.compose("down", "-v", "--remove-orphans", timeout=300)
    stack.down = True
    assert stack.compose.resources() == {"containers": [], "networks": [], "volumes": []}
    assert not existing_volumes(stack.volumes), "volumes of the stack's containers are left behind"
