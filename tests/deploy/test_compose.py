"""docker-compose.yml against the code: commands, settings, ports, health checks, scraping."""

from __future__ import annotations

import json
import re
import tomllib

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ditepose.cli import build_parser
from ditepose.service.core.settings import Settings
from ditepose.service.http.app import create_app
from tests.conftest import REPO_ROOT
from tests.deploy.compose_support import (
    COMPOSE_FILE,
    DASHBOARD_FILE,
    DATASETS_TARGET,
    GPU_OVERRIDE,
    GRAFANA_PROVISIONING,
    PORTS_OVERRIDE,
    PROMETHEUS_FILE,
    bind_source,
    compose,
    container_ports,
    ditepose_args,
    environment,
    flag_value,
    gen_config,
    healthcheck_argv,
    load_yaml,
    services,
    urls_in,
)

EXPECTED_SERVICES = {"redis", "api", "worker", "prometheus", "grafana"}
OUR_SERVICES = ("api", "worker")
# Host folders an operator fills (checkpoints, datasets); Docker creates them when missing.
OPERATOR_FOLDERS = {"./models", "./data", "./videos"}


def subcommands() -> dict[str, object]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)  # type: ignore[arg-type]


def app_paths() -> set[str]:
    """GET routes of the real app (from its OpenAPI document: FastAPI's public view of the routes)."""
    app = create_app(Settings(_env_file=None, grpc_enabled=False))
    return {path for path, ops in app.openapi()["paths"].items() if "get" in ops}


def rest_port(args: list[str]) -> int:
    return int(flag_value(args, "--port") or Settings.model_fields["port"].default)


def grpc_port(args: list[str]) -> int:
    return int(flag_value(args, "--grpc-port") or Settings.model_fields["grpc_port"].default)


def test_the_whole_system_is_there_and_every_service_has_a_healthcheck():
    assert set(services()) == EXPECTED_SERVICES
    for name, service in services().items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert healthcheck_argv(service), name
        assert service.get("restart") == "unless-stopped", name


def test_ditepose_services_run_real_subcommands_with_valid_flags():
    parser = build_parser()
    commands = subcommands()
    ran = {}
    for name in OUR_SERVICES:
        args = ditepose_args(services()[name])
        assert args, f"{name} does not run `ditepose ...`"
        assert args[0] in commands, f"{name}: `ditepose {args[0]}` is not a sub-command ({sorted(commands)})"
        parsed = parser.parse_args(args)  # SystemExit on an unknown flag or a bad value
        ran[name] = parsed.command
    assert ran == {"api": "serve", "worker": "worker"}
    assert flag_value(ditepose_args(services()["api"]), "--host") == "0.0.0.0"


def test_every_ditepose_variable_is_a_settings_field_and_validates(monkeypatch: pytest.MonkeyPatch):
    known = gen_config().env_vars()
    for name in OUR_SERVICES:
        env = environment(services()[name])
        ours = {k: v for k, v in env.items() if k.startswith("DITEPOSE_")}
        assert ours, name
        unknown = sorted(set(ours) - set(known))
        assert not unknown, f"{name} sets variables no settings model reads: {unknown}"
        for key, value in ours.items():
            monkeypatch.setenv(key, value)
        for _, cls in gen_config().available_sources():
            cls(_env_file=None)  # the values parse (JSON ones included)
        for key in ours:
            monkeypatch.delenv(key)


def test_api_key_is_on_through_a_compose_secret():
    api = services()["api"]
    env = environment(api)
    assert env["DITEPOSE_API_KEY_FILE"] == "/run/secrets/api_key"
    assert "api_key" in api["secrets"]
    secret_file = REPO_ROOT / load_yaml(REPO_ROOT / "docker-compose.yml")["secrets"]["api_key"]["file"]
    settings = Settings(_env_file=None, api_key_file=secret_file)
    assert settings.resolved_api_key()


def test_ports_match_the_command_flags_and_settings_defaults():
    api, worker = services()["api"], services()["worker"]
    args = ditepose_args(api)
    assert container_ports(api) == {rest_port(args), grpc_port(args)}
    published = {str(p) for p in api["ports"]}
    assert published == {f"{rest_port(args)}:{rest_port(args)}", f"{grpc_port(args)}:{grpc_port(args)}"}
    worker_args = ditepose_args(worker)
    metrics_port = int(flag_value(worker_args, "--metrics-port"))
    assert container_ports(worker) == {metrics_port}
    assert "ports" not in worker, "a worker publishing host ports could not be scaled"
    assert "container_name" not in worker, "container_name prevents --scale worker=N"
    # Inside a container the metrics must listen on every interface, or Prometheus cannot reach them.
    assert flag_value(worker_args, "--metrics-host") == "0.0.0.0"


def test_healthchecks_hit_real_endpoints_on_the_right_ports():
    paths = app_paths()
    api_args = ditepose_args(services()["api"])
    api_urls = urls_in(" ".join(healthcheck_argv(services()["api"])))
    assert [u["path"] for u in api_urls] == ["/healthz"]
    assert "/healthz" in paths
    assert int(api_urls[0]["port"]) == rest_port(api_args)
    worker_urls = urls_in(" ".join(healthcheck_argv(services()["worker"])))
    assert len(worker_urls) == 1
    assert int(worker_urls[0]["port"]) == int(flag_value(ditepose_args(services()["worker"]), "--metrics-port"))
    assert healthcheck_argv(services()["redis"]) == ["redis-cli", "ping"]
    for name, port in (("prometheus", 9090), ("grafana", 3000)):
        (url,) = urls_in(" ".join(healthcheck_argv(services()[name])))
        assert int(url["port"]) == port and port in container_ports(services()[name])


def test_redis_persists_to_a_volume_and_everyone_finds_it():
    redis = services()["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") and not v.startswith(".") for v in redis["volumes"])
    for name in OUR_SERVICES:
        assert environment(services()[name])["DITEPOSE_REDIS_URL"].startswith("redis://redis:6379/")
        assert services()[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_api_and_workers_share_the_jobs_volume():
    jobs_dir = environment(services()["api"])["DITEPOSE_JOBS_DIR"]
    assert environment(services()["worker"])["DITEPOSE_JOBS_DIR"] == jobs_dir
    for name in OUR_SERVICES:
        assert f"jobs:{jobs_dir}" in services()[name]["volumes"]


def test_api_and_workers_read_the_same_video_catalogue_folder():
    """Video jobs: the api checks a named video and the workers decode it, so both mount the folder
    DITEPOSE_VIDEO_DIR names (read-only); uploads and results are in the shared jobs volume (above)."""
    for name in OUR_SERVICES:
        video_dir = environment(services()[name])["DITEPOSE_VIDEO_DIR"]
        assert f"./videos:{video_dir}:ro" in services()[name]["volumes"], name


def test_base_file_runs_anywhere_and_the_gpu_override_adds_cuda_and_gpus():
    """Additive overrides only: Compose v1 (docker-compose 1.29) can add to a service, not remove
    (no ``!reset``), so the base file is the CPU image without reservations."""
    assert "name" not in compose()  # Compose v1 rejects a top-level name
    override = load_yaml(GPU_OVERRIDE)
    assert "!reset" not in GPU_OVERRIDE.read_text() and "!override" not in GPU_OVERRIDE.read_text()
    assert set(override["services"]) == set(OUR_SERVICES)
    for name in OUR_SERVICES:
        base = services()[name]
        assert "deploy" not in base and base["build"]["dockerfile"] == "docker/Dockerfile.cpu"
        assert base["image"].endswith(":cpu")
        gpu = override["services"][name]
        (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
        assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda" and gpu["image"].endswith(":cuda")
        assert (REPO_ROOT / gpu["build"]["context"] / gpu["build"]["dockerfile"]).is_file()


def test_host_ports_are_published_by_the_default_override_only():
    """docker-compose.yml publishes nothing (a host-network stack can then use it as is, as the compose
    test does); docker-compose.override.yml, read by default, publishes the api, Prometheus and Grafana."""
    base = load_yaml(COMPOSE_FILE)["services"]
    assert not any("ports" in service for service in base.values())
    override = load_yaml(PORTS_OVERRIDE)["services"]
    assert set(override) == {"api", "prometheus", "grafana"}
    assert all(set(service) == {"ports"} for service in override.values())


def test_files_the_compose_file_mounts_exist():
    doc = load_yaml(REPO_ROOT / "docker-compose.yml")
    assert "configs" not in doc  # Compose v1 ignores `configs:` outside a swarm: plain bind mounts
    for name, service in services().items():
        if "build" in service:
            assert (REPO_ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert source in OPERATOR_FOLDERS or (REPO_ROOT / source).exists(), f"{name}: {source} missing"
    for entry in doc["secrets"].values():
        assert (REPO_ROOT / entry["file"]).is_file(), entry
    sources = {bind_source(services()[name], DATASETS_TARGET) for name in OUR_SERVICES}
    assert len(sources) == 1 and None not in sources, sources
    for name in OUR_SERVICES:
        assert environment(services()[name])["DITEPOSE_DATASETS_FILE"] == DATASETS_TARGET
    datasets = json.loads((REPO_ROOT / sources.pop()).read_text())
    from ditepose.service.core.settings import DatasetSpec

    for spec in datasets.values():
        DatasetSpec.model_validate(spec)


def test_prometheus_scrapes_what_api_and_workers_expose():
    config = load_yaml(PROMETHEUS_FILE)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api_job = jobs["ditepose-api"]
    assert api_job["metrics_path"] in app_paths()
    (target,) = api_job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "api" and int(port) == rest_port(ditepose_args(services()["api"]))
    worker_job = jobs["ditepose-worker"]
    (sd,) = worker_job["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["type"] == "A"  # every replica of a scaled service
    assert int(sd["port"]) == int(flag_value(ditepose_args(services()["worker"]), "--metrics-port"))
    prom = services()["prometheus"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in prom["volumes"]}
    assert mounted["./docker/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard():
    grafana = services()["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    (provider,) = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "ditepose.yml")["providers"]
    assert mounts["./docker/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"], panel["title"]


def _exported_names(text: str) -> set[str]:
    """Series names a registry exports, including families that have no samples yet."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",), "unknown": ("",)}
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return {m for expr in exprs for m in re.findall(r"\b(ditepose_[a-z0-9_]+)\b", expr)}


@pytest.fixture(scope="module")
def exported_metric_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Scraped from a live app (with the job routes used once) plus a worker's job metrics registry."""
    from prometheus_client import CollectorRegistry, generate_latest

    settings = Settings(_env_file=None, grpc_enabled=False)
    with TestClient(create_app(settings)) as client:
        client.get("/readyz")  # builds the job service: its metrics join the app's registry
        assert client.get("/healthz").status_code == 200
        text = client.get("/metrics").text
    names = _exported_names(text)
    from ditepose.service.jobs.metrics import JobMetrics

    registry = CollectorRegistry()
    JobMetrics(registry)
    names |= _exported_names(generate_latest(registry).decode())
    return names


def test_dashboard_queries_only_metrics_that_are_exported(exported_metric_names: set[str]):
    used = dashboard_metric_names()
    assert len(used) >= 15
    missing = sorted(used - exported_metric_names)
    assert not missing, f"the dashboard queries metrics nobody exports: {missing}"
    # The panels the operator's guide promises.
    for needed in ("ditepose_http_requests_total", "ditepose_http_request_duration_seconds_bucket",
                   "ditepose_batch_size_bucket", "ditepose_queue_depth", "ditepose_job_records",
                   "ditepose_jobs_finished_total", "ditepose_gpu_memory_allocated_bytes"):
        assert needed in used, needed


def test_pins_of_the_images_match_pyproject():
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {d.split("==")[0]: d.split("==")[1] for d in deps if "==" in d}
    for dockerfile in (REPO_ROOT / "docker").glob("Dockerfile.*"):
        text = dockerfile.read_text()
        for package in ("torch", "torchvision"):
            assert f"{package}=={pins[package]}" in text, f"{dockerfile.name}: {package} pin differs"


def test_dashboard_job_panels_use_exported_job_metrics(exported_metric_names: set[str]):
    job_metrics = {m for m in dashboard_metric_names() if m.startswith(("ditepose_job_", "ditepose_jobs_"))}
    assert len(job_metrics) >= 5
    assert job_metrics <= exported_metric_names, sorted(job_metrics - exported_metric_names)


def test_operators_guide_names_real_metrics_files_and_commands(exported_metric_names: set[str]):
    guide = (REPO_ROOT / "docs" / "operations.md").read_text()
    names = set(re.findall(r"\b(ditepose_[a-z0-9_]+[a-z0-9])\b", guide))
    assert len(names) >= 15
    unknown = sorted(n for n in names if n not in exported_metric_names and f"{n}_bucket" not in exported_metric_names)
    assert not unknown, f"docs/operations.md names metrics nobody exports: {unknown}"
    for link in re.findall(r"\]\(([^)#]+)\)", guide):
        if not link.startswith("http"):
            assert (REPO_ROOT / "docs" / link).resolve().exists(), link
    known = set(gen_config().env_vars())
    for variable in set(re.findall(r"\b(DITEPOSE_[A-Z0-9_]+)\b", guide)):
        assert variable in known, variable
    commands = subcommands()
    for command in set(re.findall(r"`ditepose ([a-z-]+)", guide)):
        assert command in commands, command
