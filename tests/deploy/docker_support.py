"""Running the real thing with Docker: the engine check, the base images, the host's package
indexes served to `docker build`, and docker-compose (v1 or v2) on a project of the test's own.

Every container of these tests uses host networking, so all traffic stays on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests import support
from tests.conftest import REPO_ROOT, stop_process_group

T = TypeVar("T")
LOOPBACK = "127.0.0.1"
BUILD_BASE = REPO_ROOT / "docker" / "build-base.sh"
# The Debian-python base docker/build-base.sh builds where python:3.11-slim-bookworm cannot be pulled.
LOCAL_PYTHON_BASE = "ditepose-base/python:3.11-bookworm"
OFFICIAL_PYTHON_BASE = "python:3.11-slim-bookworm"
# Fixed, so the build argument that names it (PIP_EXTRA_INDEX_URL) keeps Docker's layer cache warm.
INDEX_PORT = int(os.environ.get("DITEPOSE_TEST_INDEX_PORT", "38765"))


def free_port() -> int:
    return support.free_port(LOOPBACK)


def wait_for(fn: Callable[[], T], timeout: float, what: str, on_timeout: Callable[[], str] | None = None) -> T:
    """:func:`tests.support.wait_until` at a Docker pace: each probe may run a docker command."""
    return support.wait_until(fn, timeout, what, interval=0.5, on_timeout=on_timeout)


def run(argv: Sequence[str], timeout: float = 600, check: bool = True, env: dict[str, str] | None = None,
        cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


# ---------------------------------------------------------------------------- the engine
def compose_command() -> list[str] | None:
    """docker-compose v1 (Debian's 1.29) or the v2 plugin (`docker compose`), whichever is here."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def docker_missing() -> str | None:
    """Why the Docker tests cannot run here (worded so DITEPOSE_REQUIRE_SYSTEM=1 fails them), or None."""
    if shutil.which("docker") is None:
        return "docker is not installed (apt-get install docker.io, or scripts/ensure-system-deps)"
    if compose_command() is None:
        return "docker-compose is not installed (apt-get install docker-compose)"
    probe = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                           timeout=60)
    if probe.returncode != 0:
        return ("the Docker engine is not running or not reachable (start dockerd as root, or run "
                f"scripts/ensure-system-deps): {probe.stderr.strip()[:200]}")
    return None


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def image_size_mb(name: str) -> float:
    out = run(["docker", "image", "inspect", "-f", "{{.Size}}", name]).stdout.strip()
    return int(out) / 1e6


def standin_label(name: str) -> str | None:
    out = run(["docker", "image", "inspect", "-f", '{{index .Config.Labels "io.ditepose.standin"}}', name],
              check=False).stdout.strip()
    return out if out and out != "<no value>" else None


def pull(name: str, timeout: float = 900) -> bool:
    """Whether ``docker pull`` fetched the image (False at once where no registry answers)."""
    try:
        return subprocess.run(["docker", "pull", "-q", name], capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def build_base_images() -> list[str]:
    """docker/build-base.sh (idempotent: present images are kept); its report, one line per image."""
    proc = run(["bash", str(BUILD_BASE)], timeout=900)
    return [line for line in proc.stdout.splitlines() if line.startswith("build-base:")]


# ---------------------------------------------------------------------------- package indexes
def host_file_indexes() -> list[Path]:
    """The ``file://`` indexes the host's pip is configured with (a container cannot read them)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    dirs: list[Path] = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if not key.endswith(("extra-index-url", "index-url")):
            continue
        for url in value.strip().strip("'\"").split():
            if url.startswith("file://") and Path(url[len("file://"):]).is_dir() and Path(url[7:]) not in dirs:
                dirs.append(Path(url[len("file://"):]))
    return dirs


def _serves(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def served_indexes(port: int = INDEX_PORT) -> Iterator[list[str]]:
    """The host's file:// indexes over HTTP on loopback (for `docker build --network host`); yields their URLs.

    ``/opt/pypi/simple`` is served as ``http://127.0.0.1:PORT/pypi/simple`` (its parent folder, so
    the index pages' relative links to ``../../files/`` resolve).
    """
    indexes = host_file_indexes()
    if not indexes:
        yield []
        return
    root = Path(tempfile.mkdtemp(prefix="ditepose-indexes-"))
    urls = []
    for index in indexes:
        name = index.parent.name
        while (root / name).exists():
            name += "_"
        (root / name).symlink_to(index.parent)
        urls.append(f"http://{LOOPBACK}:{port}/{name}/{index.name}")
    proc = None
    if not _serves(urls[0] + "/"):
        proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", LOOPBACK, str(port),
                                 "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_for(lambda: _serves(urls[0] + "/") or proc.poll() is not None, 20, "the index server")
        except AssertionError:
            stop_process_group(proc)
            raise
        if proc.poll() is not None:
            raise AssertionError(f"port {port} is taken by something else than this index server: "
                                 "set DITEPOSE_TEST_INDEX_PORT")
    try:
        yield urls
    finally:
        if proc is not None:
            stop_process_group(proc)
        shutil.rmtree(root, ignore_errors=True)


def build_args(index_urls: list[str]) -> dict[str, str]:
    """Build arguments that give the image the packages the host's pip sees.

    With file:// indexes on the host (this project's machines: torch==2.14.1 lives only there), the
    image's pip searches PyPI plus those indexes served on loopback, torch included; the base is
    docker/build-base.sh's Debian python where the official python image cannot be pulled.
    """
    args: dict[str, str] = {}
    if not image_exists(OFFICIAL_PYTHON_BASE) or standin_label(OFFICIAL_PYTHON_BASE):
        args["PYTHON_IMAGE"] = LOCAL_PYTHON_BASE
    if index_urls:
        args["TORCH_INDEX_URL"] = "https://pypi.org/simple"
        args["PIP_EXTRA_INDEX_URL"] = " ".join(index_urls)
    for name in ("TORCH_INDEX_URL", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PYTHON_IMAGE"):
        if os.environ.get(f"DITEPOSE_DOCKER_{name}"):  # an operator's choice wins
            args[name] = os.environ[f"DITEPOSE_DOCKER_{name}"]
    return args


# ---------------------------------------------------------------------------- compose
class Compose:
    """One compose project (its own name: its containers, network and volumes are the test's)."""

    def __init__(self, project: str, files: Sequence[Path]) -> None:
        command = compose_command()
        assert command is not None
        self.project = project
        self.argv = [*command, "--project-name", project, "--project-directory", str(REPO_ROOT)]
        for path in files:
            self.argv += ["-f", str(path)]
        self.version = run([*command, "version", "--short"], check=False).stdout.strip()

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([*self.argv, *args], timeout=timeout, check=check)

    def config(self) -> dict[str, Any]:
        import yaml

        return yaml.safe_load(self("config").stdout)

    def container(self, service: str) -> str:
        ids = self("ps", "-q", service).stdout.split()
        assert len(ids) == 1, (service, ids)
        return ids[0]

    def inspect(self, service: str) -> dict[str, Any]:
        return json.loads(run(["docker", "inspect", self.container(service)]).stdout)[0]

    def health(self, service: str) -> str:
        state = self.inspect(service)["State"]
        return state.get("Health", {}).get("Status") or state["Status"]

    def logs(self, service: str | None = None) -> str:
        args = ["logs", "--no-color"] + ([service] if service else [])
        proc = self(*args, check=False)
        return proc.stdout + proc.stderr

    def resources(self) -> dict[str, list[str]]:
        """Containers, networks and volumes that carry this project's label."""
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": run(["docker", "ps", "-a", "-q", "--filter", label]).stdout.split(),
            "networks": run(["docker", "network", "ls", "-q", "--filter", label]).stdout.split(),
            "volumes": run(["docker", "volume", "ls", "-q", "--filter", label]).stdout.split(),
        }

    def mounted_volumes(self) -> set[str]:
        """Every volume (named or anonymous) mounted by this project's containers."""
        out = set()
        for cid in self.resources()["containers"]:
            for mount in json.loads(run(["docker", "inspect", cid]).stdout)[0]["Mounts"]:
                if mount["Type"] == "volume":
                    out.add(mount["Name"])
        return out


def existing_volumes(names: set[str]) -> set[str]:
    present = set(run(["docker", "volume", "ls", "-q"]).stdout.split())
    return names & present
