"""deploy/k8s against Kubernetes and the code: rendered with ``kubectl kustomize``, every object
checked against the Kubernetes schemas (kubernetes-validate, strict), then commands, settings,
ports, probes, volumes and selectors against the CLI, the settings, the app and docker-compose.yml.

There is no cluster here: this is the static half. kubectl is needed; when it is missing the
tests install Debian's ``kubernetes-client`` (as root with apt-get) or fail saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from ditepose.cli import build_parser
from ditepose.service.core.settings import DatasetSpec, Settings
from tests.conftest import REPO_ROOT
from tests.deploy.compose_support import (
    DOCKERFILES,
    as_argv,
    ditepose_args,
    dockerfile_stages,
    environment,
    flag_value,
    gen_config,
    healthcheck_argv,
    load_yaml,
    services,
)
from tests.deploy.test_compose import (  # noqa: F401 (exported_metric_names is a fixture)
    app_paths,
    exported_metric_names,
    grpc_port,
    rest_port,
    subcommands,
)

K8S = REPO_ROOT / "deploy" / "k8s"
COMPONENT = K8S / "components" / "queue-depth-hpa"
DEBIAN_PACKAGE = "kubernetes-client"
NAMESPACE = "ditepose"
API, WORKER, REDIS = "ditepose-api", "ditepose-worker", "ditepose-redis"
API_KEY_SECRET = "ditepose-api-key"
# The oldest Kubernetes the manifests are written for (autoscaling/v2, policy/v1,
# unhealthyPodEvictionPolicy) and the newest whose schemas kubernetes-validate has.
SCHEMA_VERSIONS = ("1.27", kubernetes_validate.latest_version())
OPERATIONS = REPO_ROOT / "docs" / "operations.md"


# ---------------------------------------------------------------- kubectl and rendering


def _install_kubectl() -> str | None:
    """``apt-get install kubernetes-client``; None when it worked, else why it could not."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    if os.geteuid() != 0:
        return "apt-get needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", DEBIAN_PACKAGE]
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # a stale or empty package list: refresh it once
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0 or shutil.which("kubectl") is None:
        return f"`{' '.join(install)}` failed: {(done.stderr or done.stdout).strip()[-500:]}"
    return None


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        why = _install_kubectl()
        path = shutil.which("kubectl")
        if path is None:
            pytest.fail(
                f"kubectl is not on PATH and Debian's package {DEBIAN_PACKAGE} could not be installed ({why}). "
                f"Install it (`apt-get install {DEBIAN_PACKAGE}`) or any kubectl >= 1.27 to render deploy/k8s."
            )
    return path


def _kubectl_version(kubectl: str) -> str:
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True)
    return " ".join((out.stdout + out.stderr).split())[:300]


@cache
def _render(kubectl: str, directory: Path) -> tuple[dict[str, Any], ...]:
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(
            f"`kubectl kustomize {directory.relative_to(REPO_ROOT) if directory.is_relative_to(REPO_ROOT) else directory}`"
            f" failed: {done.stderr.strip()}\n(kubectl: {_kubectl_version(kubectl)}; deploy/k8s needs kustomize v5, "
            "i.e. kubectl >= 1.27. Debian bookworm's kubernetes-client is kubectl 1.20 with kustomize v2.0.3, "
            "which cannot load it.)"
        )
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@pytest.fixture(scope="session")
def queue_depth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/k8s with the optional queue-depth component, as the kustomization's comment says."""
    folder = tmp_path_factory.mktemp("k8s-queue-depth")
    root = os.path.relpath(K8S, folder)  # kustomize takes relative paths only
    (folder / "kustomization.yaml").write_text(
        yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [root],
            "components": [os.path.relpath(COMPONENT, folder)],
        })
    )
    return folder


@pytest.fixture(scope="session", params=["gpu", "cpu", "queue-depth"])
def variant(request: pytest.FixtureRequest, kubectl: str, queue_depth_dir: Path) -> tuple[str, tuple[dict, ...]]:
    directory = {"gpu": K8S, "cpu": K8S / "cpu", "queue-depth": queue_depth_dir}[request.param]
    return request.param, _render(kubectl, directory)


@pytest.fixture(scope="session")
def gpu(kubectl: str) -> tuple[dict[str, Any], ...]:
    return _render(kubectl, K8S)


@pytest.fixture(scope="session")
def cpu(kubectl: str) -> tuple[dict[str, Any], ...]:
    return _render(kubectl, K8S / "cpu")


# ---------------------------------------------------------------- reading the objects


def get(objects: tuple[dict, ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def by_kind(objects: tuple[dict, ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def workloads(objects: tuple[dict, ...]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def pod_spec(workload: dict) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict) -> dict[str, Any]:
    (only,) = pod_spec(workload)["containers"]
    return only


def argv(c: dict) -> list[str]:
    return as_argv(c.get("command")) + as_argv(c.get("args"))


def named_port(c: dict, name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    (port,) = [p["containerPort"] for p in c["ports"] if p.get("name") == name_or_number]
    return port


def env_of(objects: tuple[dict, ...], c: dict) -> dict[str, str]:
    """What the container sees: its ConfigMaps (envFrom), then its own env (which wins)."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(get(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in c.get("env", []):
        assert "value" in item, f"{item['name']}: only plain values are expected"
        env[item["name"]] = item["value"]
    return env


def mounts(workload: dict) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there (with the mount's readOnly)."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    out = {}
    for mount in container(workload).get("volumeMounts", []):
        assert mount["name"] in volumes, f"{workload['metadata']['name']}: no volume {mount['name']}"
        out[mount["mountPath"]] = {**volumes[mount["name"]], "readOnly": mount.get("readOnly", False)}
    return out


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def probe_target(c: dict, probe: str) -> tuple[str, int]:
    get_ = c[probe]["httpGet"]
    return get_["path"], named_port(c, get_["port"])


# ---------------------------------------------------------------- schemas and shape


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(variant, version):
    name, objects = variant
    assert len(objects) >= 15, name
    errors = []
    for obj in objects:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)  # strict: unknown fields are errors
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{what}: {'.'.join(map(str, error.path))}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:  # an unknown kind or apiVersion
            errors.append(f"{what}: {error.message}")
    assert not errors, f"{name} against Kubernetes {version}:\n" + "\n".join(errors)


def test_the_whole_system_is_there_in_its_namespace(variant):
    name, objects = variant
    have = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for needed in [("Namespace", NAMESPACE), ("Deployment", API), ("Deployment", WORKER), ("StatefulSet", REDIS),
                   ("Service", API), ("Service", f"{API}-grpc"), ("Service", REDIS),
                   ("PodDisruptionBudget", API), ("HorizontalPodAutoscaler", API)]:
        assert needed in have, f"{name}: {needed} missing"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ditepose", obj["metadata"]["name"]
    # The key is the operator's: the manifests reference a Secret and never carry one.
    assert not by_kind(objects, "Secret"), f"{name}: a Secret (a key in git)"


# ---------------------------------------------------------------- against the code and compose


def test_containers_run_the_commands_of_docker_compose(gpu, cpu):
    parser, commands = build_parser(), subcommands()
    for objects in (gpu, cpu):
        for workload, service, expected in ((API, "api", "serve"), (WORKER, "worker", "worker")):
            c = container(get(objects, "Deployment", workload))
            args = argv(c)
            assert args[0] == "ditepose" and args[1] in commands, args
            assert parser.parse_args(args[1:]).command == expected  # SystemExit on a bad flag
            assert args[1:] == ditepose_args(services()[service]), f"{workload}: not compose's command"
        redis = container(get(objects, "StatefulSet", REDIS))
        assert argv(redis) == as_argv(services()["redis"]["command"])
        assert redis["image"] == services()["redis"]["image"]
        assert "command" not in redis, "keep the redis image's entrypoint, as compose does"
    # `args` replace the image's CMD only: right because our images have no ENTRYPOINT.
    for dockerfile in DOCKERFILES:
        runtime = dockerfile_stages(dockerfile)[-1]
        assert "ENTRYPOINT" not in {keyword for keyword, _ in runtime.instructions}, dockerfile.name


def test_every_ditepose_variable_is_a_setting_and_validates(variant, monkeypatch: pytest.MonkeyPatch):
    name, objects = variant
    known = gen_config().env_vars()
    for workload in (API, WORKER):
        env = env_of(objects, container(get(objects, "Deployment", workload)))
        ours = {k: v for k, v in env.items() if k.startswith("DITEPOSE_")}
        assert ours and set(env) - set(ours) == {"HOME"}, f"{name}/{workload}: {sorted(set(env) - set(ours))}"
        unknown = sorted(set(ours) - set(known))
        assert not unknown, f"{name}/{workload} sets variables no settings model reads: {unknown}"
        with monkeypatch.context() as patched:
            for key, value in ours.items():
                patched.setenv(key, value)
            for _, cls in gen_config().available_sources():
                cls(_env_file=None)  # the values parse


def test_api_and_workers_share_the_settings_compose_gives_them(gpu):
    api = env_of(gpu, container(get(gpu, "Deployment", API)))
    worker = env_of(gpu, container(get(gpu, "Deployment", WORKER)))
    for key in set(api) & set(worker):
        assert api[key] == worker[key], f"{key} differs between api and worker"
    for service, env in (("api", api), ("worker", worker)):
        for key, value in environment(services()[service]).items():
            assert key in env, f"{service}: compose sets {key}, the manifests do not"
            if key not in ("DITEPOSE_REDIS_URL", "DITEPOSE_API_KEY_FILE"):  # host names and secret paths differ
                assert env[key] == value, f"{service}: {key}={env[key]!r}, compose has {value!r}"


def test_redis_url_reaches_the_redis_service_and_redis_persists(gpu):
    env = env_of(gpu, container(get(gpu, "Deployment", API)))
    url = urlparse(env["DITEPOSE_REDIS_URL"])
    assert url.scheme == "redis" and url.hostname == REDIS
    service = get(gpu, "Service", REDIS)
    statefulset = get(gpu, "StatefulSet", REDIS)
    (port,) = service["spec"]["ports"]
    assert port["port"] == url.port
    redis = container(statefulset)
    assert named_port(redis, port["targetPort"]) == 6379
    assert selects(service["spec"]["selector"], statefulset["spec"]["template"]["metadata"]["labels"])
    governing = get(gpu, "Service", statefulset["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    args = argv(redis)
    assert args[args.index("--appendonly") + 1] == "yes"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert mounts_of_claims(redis)[claim["metadata"]["name"]] == "/data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    probes = [redis[p]["exec"]["command"] for p in ("readinessProbe", "livenessProbe")]
    assert probes == [healthcheck_argv(services()["redis"])] * 2
    # Only the api and the workers reach it.
    (policy,) = by_kind(gpu, "NetworkPolicy")
    pod_labels = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(gpu)}
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels[REDIS])
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    expressions = peer["podSelector"]["matchExpressions"]
    assert {e["operator"] for e in expressions} == {"In"}
    allowed = {n for n, labels in pod_labels.items() if all(labels.get(e["key"]) in e["values"] for e in expressions)}
    assert allowed == {API, WORKER}
    assert [named_port(redis, p["port"]) for p in rule["ports"]] == [6379]


def mounts_of_claims(c: dict) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}


def test_ports_match_the_flags_and_the_settings_defaults(gpu):
    api = container(get(gpu, "Deployment", API))
    args = ditepose_args({"command": argv(api)})
    assert flag_value(args, "--host") == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in api["ports"]} == {"http": rest_port(args), "grpc": grpc_port(args)}
    worker = container(get(gpu, "Deployment", WORKER))
    worker_args = ditepose_args({"command": argv(worker)})
    assert flag_value(worker_args, "--metrics-host") == "0.0.0.0"
    assert [p["containerPort"] for p in worker["ports"]] == [int(flag_value(worker_args, "--metrics-port"))]
    for service_name in (API, f"{API}-grpc"):
        for port in get(gpu, "Service", service_name)["spec"]["ports"]:
            assert named_port(api, port["targetPort"]) == port["port"], f"{service_name}: {port}"
    names = {p["name"] for p in get(gpu, "Service", API)["spec"]["ports"]}
    assert names == {"http", "grpc"}


def test_grpc_has_a_headless_service_for_balancing_streams(gpu):
    headless = get(gpu, "Service", f"{API}-grpc")["spec"]
    assert headless["clusterIP"] == "None"
    (port,) = headless["ports"]
    assert port["name"] == "grpc"
    assert not headless.get("publishNotReadyAddresses"), "clients must only see ready pods"
    api = get(gpu, "Deployment", API)
    assert selects(headless["selector"], api["spec"]["template"]["metadata"]["labels"])


def test_probes_hit_real_endpoints_on_the_right_ports(variant):
    name, objects = variant
    paths = app_paths()
    api = container(get(objects, "Deployment", API))
    rest = rest_port(ditepose_args({"command": argv(api)}))
    assert probe_target(api, "readinessProbe") == ("/readyz", rest)
    assert probe_target(api, "livenessProbe") == ("/healthz", rest)
    assert probe_target(api, "startupProbe") == ("/healthz", rest)
    assert {"/readyz", "/healthz"} <= paths
    # Models load before the port opens: the startup probe must allow more than compose's start_period.
    startup = api["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, name
    assert api["readinessProbe"]["timeoutSeconds"] > Settings.model_fields["redis_timeout_s"].default
    worker = container(get(objects, "Deployment", WORKER))
    metrics_port = int(flag_value(ditepose_args({"command": argv(worker)}), "--metrics-port"))
    for probe in ("startupProbe", "livenessProbe"):
        assert probe_target(worker, probe) == ("/metrics", metrics_port), f"{name}: worker {probe}"


def test_prometheus_scrape_annotations_point_at_the_metrics(gpu):
    api = get(gpu, "Deployment", API)
    worker = get(gpu, "Deployment", WORKER)
    api_c, worker_c = container(api), container(worker)
    expected = {
        API: (rest_port(ditepose_args({"command": argv(api_c)})), "/metrics"),
        WORKER: (int(flag_value(ditepose_args({"command": argv(worker_c)}), "--metrics-port")), "/metrics"),
    }
    for workload in (api, worker):
        notes = workload["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert (int(notes["prometheus.io/port"]), notes["prometheus.io/path"]) == expected[workload["metadata"]["name"]]
        assert int(notes["prometheus.io/port"]) in {p["containerPort"] for p in container(workload)["ports"]}
    assert "/metrics" in app_paths()
    # The scrape job that reads them keeps the labels prometheus-adapter maps to pods.
    (job,) = load_yaml(K8S / "prometheus" / "scrape-config.yaml")["scrape_configs"]
    relabel = job["relabel_configs"]
    sources = {s for rule in relabel for s in rule["source_labels"]}
    for annotation in ("scrape", "port", "path"):
        assert f"__meta_kubernetes_pod_annotation_prometheus_io_{annotation}" in sources
    targets = {rule.get("target_label") for rule in relabel}
    assert {"namespace", "pod", "__metrics_path__", "__address__"} <= targets
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [NAMESPACE]


# ---------------------------------------------------------------- GPUs, CPUs and images


def gpus(c: dict) -> tuple[Any, Any]:
    resources = c.get("resources", {})
    return resources.get("requests", {}).get("nvidia.com/gpu"), resources.get("limits", {}).get("nvidia.com/gpu")


def test_gpu_layout_requests_a_gpu_per_pod_on_the_cuda_image(gpu):
    for workload in (API, WORKER):
        deployment = get(gpu, "Deployment", workload)
        c = container(deployment)
        assert gpus(c) == (1, 1), f"{workload}: extended resources need equal requests and limits"
        assert c["image"] == "ditepose:cuda"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(deployment)["tolerations"])
        assert env_of(gpu, c)["DITEPOSE_DEVICES"] == "auto"  # the GPUs the device plugin shows the pod
    assert (REPO_ROOT / "docker" / "Dockerfile.cuda").is_file()


def test_cpu_layout_has_no_gpus_and_sizes_the_pool_to_the_pod(cpu):
    for workload in (API, WORKER):
        deployment = get(cpu, "Deployment", workload)
        c = container(deployment)
        assert gpus(c) == (None, None), workload
        assert "tolerations" not in pod_spec(deployment)
        assert c["image"] == "ditepose:cpu"
        env = env_of(cpu, c)
        assert env["DITEPOSE_DEVICES"] == "cpu"
        # os.cpu_count() in a pod is the node's: the pool is sized to the pod's CPUs explicitly.
        threads = int(env["DITEPOSE_WORKERS_PER_DEVICE"]) * int(env["DITEPOSE_TORCH_THREADS"])
        assert threads == int(c["resources"]["limits"]["cpu"]), workload
    assert (REPO_ROOT / "docker" / "Dockerfile.cpu").is_file()


def test_every_container_has_requests_and_memory_limits(variant):
    name, objects = variant
    for workload in workloads(objects):
        for c in pod_spec(workload)["containers"]:
            resources = c["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), f"{name}: {c['name']}"
            assert "memory" in resources["limits"], f"{name}: {c['name']}"


# ---------------------------------------------------------------- security


def dockerfile_uid() -> int:
    uids = set()
    for dockerfile in DOCKERFILES:
        uids |= {int(u) for u in re.findall(r"useradd [^&]*--uid (\d+)", dockerfile.read_text())}
    (uid,) = uids
    return uid


def test_pods_run_non_root_without_privileges(variant):
    name, objects = variant
    for workload in workloads(objects):
        spec = pod_spec(workload)
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        if workload["metadata"]["name"] in (API, WORKER):
            assert context["runAsUser"] == context["runAsGroup"] == context["fsGroup"] == dockerfile_uid()
        for c in spec["containers"]:
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, f"{name}: {c['name']}"
            assert security["capabilities"]["drop"] == ["ALL"]
            assert security["readOnlyRootFilesystem"] is True


def test_what_the_processes_write_is_a_volume(gpu):
    """Read-only root file systems: the jobs folder, /tmp (the workers' multiprocess metrics) and
    $HOME are volumes; checkpoints, datasets and the key are mounted read-only."""
    for workload in (API, WORKER):
        deployment = get(gpu, "Deployment", workload)
        env = env_of(gpu, container(deployment))
        mounted = mounts(deployment)
        jobs = mounted[env["DITEPOSE_JOBS_DIR"]]
        assert not jobs["readOnly"] and "persistentVolumeClaim" in jobs
        for path in ("/tmp", env["HOME"]):
            assert "emptyDir" in mounted[path], f"{workload}: {path}"
        assert env["HOME"] == "/home/ditepose"  # the images' user's home (useradd --home-dir)
        for dockerfile in DOCKERFILES:
            assert f"--home-dir {env['HOME']}" in dockerfile.read_text(), dockerfile.name
        assert mounted[env["DITEPOSE_CHECKPOINT_DIR"]]["readOnly"]
        catalogue = Path(env["DITEPOSE_DATASETS_FILE"])
        datasets = mounted[str(catalogue.parent)]
        assert datasets["readOnly"]
        data = get(gpu, "ConfigMap", datasets["configMap"]["name"])["data"]
        assert catalogue.name in data
        assert json.loads(data[catalogue.name]) == json.loads((REPO_ROOT / "docker" / "datasets.json").read_text()), (
            "deploy/k8s/base/datasets.json differs from docker/datasets.json"
        )
        for spec in json.loads(data[catalogue.name]).values():
            DatasetSpec.model_validate(spec)
    # Workers read the catalogue's files: every path in it lies under a read-only mount of theirs.
    worker = get(gpu, "Deployment", WORKER)
    mounted = mounts(worker)
    catalogue = json.loads((REPO_ROOT / "docker" / "datasets.json").read_text())
    for spec in catalogue.values():
        for key in ("ann_file", "img_dir", "det_file", "gt_file"):
            if spec.get(key):
                assert any(spec[key].startswith(m + "/") and v["readOnly"] for m, v in mounted.items()), spec[key]


def test_claims_exist_and_the_shared_ones_are_read_write_many(gpu):
    claims = {c["metadata"]["name"]: c for c in by_kind(gpu, "PersistentVolumeClaim")}
    used: dict[str, set[str]] = {}
    for workload in workloads(gpu):
        for volume in pod_spec(workload).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                used.setdefault(volume["persistentVolumeClaim"]["claimName"], set()).add(workload["metadata"]["name"])
            if "configMap" in volume:
                get(gpu, "ConfigMap", volume["configMap"]["name"])
    assert set(used) == set(claims), "every claim is used and every used claim exists"
    for claim, users in used.items():
        if len(users) > 1 or any(u in (API, WORKER) for u in users):
            assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"], claim  # pods on many nodes
    assert used["ditepose-jobs"] == {API, WORKER}
    assert used["ditepose-videos"] == {API, WORKER}


def test_api_and_workers_mount_the_video_claims(gpu):
    """Video jobs: the api writes uploads into the jobs claim and a worker reads them and writes the
    results the api serves (read-write in both); the catalogue folder (DITEPOSE_VIDEO_DIR) is the
    ditepose-videos claim, read-only in both."""
    for workload in (API, WORKER):
        deployment = get(gpu, "Deployment", workload)
        env = env_of(gpu, container(deployment))
        mounted = mounts(deployment)
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec(deployment)["volumes"]
                  if "persistentVolumeClaim" in v}
        jobs, videos = mounted[env["DITEPOSE_JOBS_DIR"]], mounted[env["DITEPOSE_VIDEO_DIR"]]
        assert not jobs["readOnly"] and jobs["persistentVolumeClaim"]["claimName"] == "ditepose-jobs", workload
        assert videos["readOnly"] and videos["persistentVolumeClaim"]["claimName"] == "ditepose-videos", workload
        assert set(claims.values()) >= {"ditepose-jobs", "ditepose-videos"}


def test_api_key_comes_from_a_secret_file(gpu):
    api = get(gpu, "Deployment", API)
    key_file = Path(env_of(gpu, container(api))["DITEPOSE_API_KEY_FILE"])
    volume = mounts(api)[str(key_file.parent)]
    assert volume["readOnly"] and volume["secret"]["secretName"] == API_KEY_SECRET
    (item,) = volume["secret"]["items"]
    assert item["path"] == key_file.name
    assert "DITEPOSE_API_KEY_FILE" not in env_of(gpu, container(get(gpu, "Deployment", WORKER)))
    # The one object the operator makes: the docs say how, with the names the pods use.
    command = f"create secret generic {API_KEY_SECRET}"
    for doc in (OPERATIONS, K8S / "README.md", K8S / "kustomization.yaml"):
        text = doc.read_text()
        assert command in text and f"{item['key']}=" in text, doc


# ---------------------------------------------------------------- selectors, PDB, HPA


def test_selectors_pick_their_own_pods_only(variant):
    name, objects = variant
    templates = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(objects)}
    for workload in workloads(objects):
        selector = workload["spec"]["selector"]["matchLabels"]
        assert [n for n, labels in templates.items() if selects(selector, labels)] == [workload["metadata"]["name"]]
    for service in by_kind(objects, "Service"):
        picked = [n for n, labels in templates.items() if selects(service["spec"]["selector"], labels)]
        assert len(picked) == 1, f"{name}: Service {service['metadata']['name']} selects {picked}"
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    picked = [n for n, labels in templates.items() if selects(pdb["spec"]["selector"]["matchLabels"], labels)]
    assert picked == [API], f"{name}: the PodDisruptionBudget selects {picked}"


def test_hpa_scales_the_api_on_cpu_and_the_pdb_never_blocks_all(gpu):
    hpa = get(gpu, "HorizontalPodAutoscaler", API)
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    api = get(gpu, "Deployment", API)
    assert (target["apiVersion"], target["kind"], target["name"]) == (api["apiVersion"], "Deployment", API)
    (metric,) = hpa["spec"]["metrics"]  # the queue-depth metric only with its component
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container(api)["resources"]["requests"]  # utilization is measured against it
    spec = hpa["spec"]
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    assert "replicas" not in api["spec"], "the HPA owns the count: `kubectl apply` would reset it"
    pdb = get(gpu, "PodDisruptionBudget", API)["spec"]
    assert "minAvailable" not in pdb and 1 <= pdb["maxUnavailable"] < spec["minReplicas"]


def test_queue_depth_component_adds_the_custom_metric(kubectl, queue_depth_dir, request):
    exported = request.getfixturevalue("exported_metric_names")  # scraped from a live app (test_compose)
    objects = _render(kubectl, queue_depth_dir)
    metrics = get(objects, "HorizontalPodAutoscaler", API)["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]
    metric = metrics[1]["pods"]["metric"]["name"]
    assert metric == "ditepose_queue_depth" and metric in exported
    assert metrics[1]["pods"]["target"]["type"] == "AverageValue"
    # prometheus-adapter serves it under that name, per pod, from the labels the scrape job sets.
    (rule,) = load_yaml(COMPONENT / "prometheus-adapter-values.yaml")["rules"]["custom"]
    assert rule["seriesQuery"].startswith(metric + "{")
    assert rule["name"]["as"] == metric and re.fullmatch(rule["name"]["matches"], metric)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # Not in the default kustomization, but named where it would be switched on.
    root = (K8S / "kustomization.yaml").read_text()
    assert "components/queue-depth-hpa" in root and "components:" not in yaml.safe_load(root)


# ---------------------------------------------------------------- docs


def test_operators_guide_says_when_to_use_compose_or_kubernetes():
    guide = OPERATIONS.read_text()
    sections = re.findall(r"^## (.+)$", guide, flags=re.M)
    assert sections[-1] == "Compose or Kubernetes", sections
    section = guide.split("## Compose or Kubernetes", 1)[1]
    assert "kubectl apply -k deploy/k8s" in section
    for topic in ("gpu", "autoscal", "grpc", "headless", "stream", "ditepose_queue_depth", "docker-compose.yml"):
        assert topic in section.lower(), topic
    for path in re.findall(r"`(deploy/k8s[\w/.-]*)`", section):
        assert (REPO_ROOT / path.split(" ")[0]).exists(), path
