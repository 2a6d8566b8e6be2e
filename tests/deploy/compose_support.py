"""Reading the deployment files: docker-compose.yml, the Dockerfiles, Prometheus and Grafana config."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.conftest import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
# Read by Compose with docker-compose.yml when no -f is given: the published host ports only.
PORTS_OVERRIDE = REPO_ROOT / "docker-compose.override.yml"
GPU_OVERRIDE = REPO_ROOT / "docker" / "compose.gpu.yml"
DATASETS_TARGET = "/etc/ditepose/datasets.json"
DOCKERFILES = (REPO_ROOT / "docker" / "Dockerfile.cpu", REPO_ROOT / "docker" / "Dockerfile.cuda")
PROMETHEUS_FILE = REPO_ROOT / "docker" / "prometheus" / "prometheus.yml"
DASHBOARD_FILE = REPO_ROOT / "docker" / "grafana" / "dashboards" / "ditepose.json"
GRAFANA_PROVISIONING = REPO_ROOT / "docker" / "grafana" / "provisioning"


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that accepts Compose's merge tags (``!reset``, ``!override``)."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return {"__tag__": node.tag, **loader.construct_mapping(node, deep=True)}
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _tagged)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # a SafeLoader subclass: no arbitrary objects


@cache
def compose() -> dict[str, Any]:
    """What `docker compose up` sees without -f: docker-compose.yml plus the ports of its override."""
    doc = load_yaml(COMPOSE_FILE)
    for name, extra in load_yaml(PORTS_OVERRIDE)["services"].items():
        assert set(extra) == {"ports"}, f"docker-compose.override.yml: {name} sets more than ports"
        service = doc["services"][name]
        service["ports"] = [*service.get("ports", []), *extra["ports"]]
    return doc


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def bind_source(service: dict[str, Any], target: str) -> str | None:
    """The host path (as written) a service bind-mounts at ``target``."""
    for volume in service.get("volumes", []):
        source, mount = volume.split(":")[:2]
        if mount == target and source.startswith("."):
            return source
    return None


def as_argv(value: str | list[str] | None) -> list[str]:
    """Compose ``command``/``entrypoint`` (string or list) as an argv list."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def ditepose_args(service: dict[str, Any]) -> list[str] | None:
    """The arguments after ``ditepose`` when the service runs our command, else None."""
    argv = as_argv(service.get("entrypoint")) + as_argv(service.get("command"))
    if argv and argv[0] == "ditepose":
        return argv[1:]
    return None


def flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def container_ports(service: dict[str, Any]) -> set[int]:
    """Container-side ports a service publishes (``ports``) or exposes to the network (``expose``)."""
    out = set()
    for entry in service.get("ports", []):
        out.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    for entry in service.get("expose", []):
        out.add(int(str(entry).split("/")[0]))
    return out


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return ["sh", "-c", test]
    kind, *rest = test
    assert kind in ("CMD", "CMD-SHELL"), test
    return rest if kind == "CMD" else ["sh", "-c", *rest]


URL_RE = re.compile(r"http://(?P<host>[\w.-]+):(?P<port>\d+)(?P<path>/[\w/.-]*)")


def urls_in(text: str) -> list[re.Match[str]]:
    return list(URL_RE.finditer(text))


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages(path: Path) -> list[Stage]:
    """Instructions per build stage, continuation lines joined, comments dropped."""
    logical: list[str] = []
    buffer = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


def copy_sources(rest: str) -> tuple[list[str], dict[str, str]]:
    """Sources and ``--flag=value`` options of a COPY instruction (shell form)."""
    parts = shlex.split(rest)
    flags = dict(p[2:].split("=", 1) for p in parts if p.startswith("--"))
    paths = [p for p in parts if not p.startswith("--")]
    return paths[:-1], flags


def dockerignore_patterns() -> list[str]:
    path = REPO_ROOT / ".dockerignore"
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def dockerignored(rel: str) -> bool:
    """Whether .dockerignore keeps ``rel`` (or a folder above it) out of the build context."""
    rel = rel.strip("/")
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in dockerignore_patterns():
        pattern = pattern.strip("/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.replace("**/", "")):
                return True
    return False


@cache
def gen_config() -> ModuleType:
    """docs/gen_config.py as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_config", REPO_ROOT / "docs" / "gen_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
