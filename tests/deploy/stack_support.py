"""Start, without Docker, exactly the processes docker-compose.yml starts, on loopback ports.

Each service's command runs as compose gives it (``ditepose`` becomes ``python -m ditepose``
from this checkout); its ``DITEPOSE_*`` environment (image ENV, then compose ``environment``)
is kept, with container paths (volumes, configs, secrets) mapped to host folders and the
``redis`` host name to the test's redis-server. Ports and bind addresses are the only flags changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tests import support
from tests.conftest import REPO_ROOT, stop_process_group, subprocess_env
from tests.deploy.compose_support import (
    DOCKERFILES,
    compose,
    dockerfile_stages,
    environment,
    healthcheck_argv,
    services,
)

T = TypeVar("T")
LOOPBACK = "127.0.0.1"
PORT_FLAGS = ("--port", "--grpc-port", "--metrics-port")
HOST_FLAGS = ("--host", "--metrics-host")


def free_port() -> int:
    return support.free_port(LOOPBACK)


def wait_for(fn: Callable[[], T], timeout: float, what: str, proc: ServiceProcess | None = None) -> T:
    """:func:`tests.support.wait_until`, giving up early when ``proc`` exits (with its log)."""

    def exited() -> str | None:
        if proc is None or proc.proc.poll() is None:
            return None
        return f"{proc.name} exited ({proc.proc.returncode}):\n{proc.log()}"

    return support.wait_until(fn, timeout, what, interval=0.1, gave_up=exited)


def image_env() -> dict[str, str]:
    """``DITEPOSE_*`` defaults the image sets (ENV of the runtime stage; both Dockerfiles agree)."""
    envs = []
    for dockerfile in DOCKERFILES:
        env: dict[str, str] = {}
        for keyword, rest in dockerfile_stages(dockerfile)[-1].instructions:
            if keyword == "ENV":
                for item in rest.split():
                    key, _, value = item.partition("=")
                    if key.startswith("DITEPOSE_"):
                        env[key] = value
        envs.append(env)
    assert all(e == envs[0] for e in envs), envs
    return envs[0]


@dataclass
class Mounts:
    """Container path -> host path for one service (volumes, configs, secrets)."""

    named_volumes: dict[str, Path]
    operator_folders: dict[str, Path]
    files: dict[str, Path] = field(default_factory=dict)

    def for_service(self, name: str) -> dict[str, Path]:
        service = services()[name]
        out: dict[str, Path] = {}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                out[target] = self.operator_folders.get(source) or (REPO_ROOT / source)
            else:
                out[target] = self.named_volumes[source]
        for config in service.get("configs", []):
            source = compose()["configs"][config["source"]]["file"]
            out[config.get("target", f"/{config['source']}")] = self.files.get(config["source"], REPO_ROOT / source)
        for secret in service.get("secrets", []):
            out[f"/run/secrets/{secret}"] = REPO_ROOT / compose()["secrets"][secret]["file"]
        return out


def map_path(value: str, mounts: dict[str, Path]) -> str:
    for target in sorted(mounts, key=len, reverse=True):
        if value == target or value.startswith(target.rstrip("/") + "/"):
            return str(mounts[target]) + value[len(target):]
    return value


class ServiceProcess:
    """One compose service as a child process (own process group), with its log in a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_file: Path) -> None:
        self.name, self.argv, self.env, self.log_file = name, argv, env, log_file
        self._log = open(log_file, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        stop_process_group(self.proc)
        self._log.close()


class Stack:
    """redis, api and worker from docker-compose.yml, started the way compose would start them."""

    def __init__(self, workdir: Path, mounts: Mounts, extra_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.mounts = mounts
        self.extra_env = extra_env or {}
        self.redis_port = free_port()
        self.ports: dict[str, dict[str, int]] = {}  # service -> flag -> port
        self.processes: dict[str, ServiceProcess] = {}

    # ------------------------------------------------------------------ commands
    def redis_argv(self) -> list[str]:
        command = list(services()["redis"]["command"])
        assert command[0] == "redis-server"
        data = self.mounts.for_service("redis")["/data"]
        data.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        return [binary, *command[1:], "--port", str(self.redis_port), "--bind", LOOPBACK, "--dir", str(data)]

    def service_argv(self, name: str) -> list[str]:
        argv = [str(a) for a in services()[name]["command"]]
        assert argv[0] == "ditepose", argv
        out = [sys.executable, "-m", "ditepose"]
        ports = self.ports.setdefault(name, {})
        args = argv[1:]
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in PORT_FLAGS:
                ports[arg] = free_port()
                out += [arg, str(ports[arg])]
                i += 2
            elif arg in HOST_FLAGS:
                out += [arg, LOOPBACK]
                i += 2
            else:
                out.append(arg)
                i += 1
        return out

    def service_env(self, name: str) -> dict[str, str]:
        mounts = self.mounts.for_service(name)
        env = {**image_env(), **environment(services()[name])}
        env = {k: map_path(v, mounts) for k, v in env.items()}
        env = {k: v.replace("redis://redis:6379", f"redis://{LOOPBACK}:{self.redis_port}") for k, v in env.items()}
        base = {k: v for k, v in subprocess_env().items() if not k.startswith("DITEPOSE_")}
        return {**base, **env, **self.extra_env}

    # ------------------------------------------------------------------ life cycle
    def start(self) -> Stack:
        self.processes["redis"] = ServiceProcess("redis", self.redis_argv(), dict(os.environ),
                                                 self.workdir / "redis.log")
        wait_for(lambda: self.healthcheck("redis") == 0, 20, "redis healthcheck", self.processes["redis"])
        for name in ("api", "worker"):
            self.processes[name] = ServiceProcess(name, self.service_argv(name), self.service_env(name),
                                                  self.workdir / f"{name}.log")
        for name in ("api", "worker"):
            wait_for(lambda n=name: self.healthcheck(n) == 0, 180, f"{name} healthcheck", self.processes[name])
        return self

    def stop(self) -> None:
        for name in ("worker", "api", "redis"):
            if name in self.processes:
                self.processes[name].stop()

    def port(self, service: str, flag: str) -> int:
        return self.ports[service][flag]

    def container_port_map(self, service: str) -> dict[int, int]:
        """Container port (as compose has it) -> the loopback port it got here."""
        argv = [str(a) for a in services()[service]["command"]]
        return {int(argv[argv.index(flag) + 1]): port for flag, port in self.ports.get(service, {}).items()}

    def healthcheck(self, name: str) -> int:
        """Run the service's compose healthcheck command, pointed at this stack's ports."""
        argv = healthcheck_argv(services()[name])
        if argv[0] == "redis-cli":
            argv = [shutil.which("redis-cli") or "redis-cli", "-p", str(self.redis_port), *argv[1:]]
        elif argv[0] == "python":
            code = argv[-1]
            for container, host in self.container_port_map(name).items():
                code = code.replace(f":{container}/", f":{host}/")
            argv = [sys.executable, *argv[1:-1], code]
        else:
            raise AssertionError(f"unexpected healthcheck {argv}")
        return subprocess.run(argv, capture_output=True, timeout=10).returncode

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.log()}" for n, p in self.processes.items())
