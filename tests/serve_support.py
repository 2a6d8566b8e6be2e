"""A real ``ditepose serve`` subprocess for the client and CLI tests: REST only, embedded jobs, the
tiny random checkpoint, the whole-image detector (so "no boxes" is one known box) and an API key."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT, python_cmd, stop_process, subprocess_env
from tests.service.grpc.support import tiny_checkpoint
from tests.support import free_port, wait_until

API_KEY = "client-test-key"
VIDEO_ROUTES_MISSING = "POST /v1/videos is not on this branch (wp-V's server side of video jobs)"


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def tiny_server(folder: Path, **env: str) -> Iterator[str]:
    """``ditepose serve`` on a free loopback port until the block ends; yields its base URL.
    ``env``: extra ``DITEPOSE_*`` variables."""
    checkpoint = tiny_checkpoint(folder / "tiny.pth")
    port = free_port()
    log_path = folder / "serve.log"
    settings = {"DITEPOSE_API_KEY": API_KEY, "DITEPOSE_DETECTOR": "whole", "DITEPOSE_MAX_DELAY_MS": "2",
                "DITEPOSE_JOBS_DIR": str(folder / "jobs"), **env}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            python_cmd("serve", "--port", str(port), "--no-grpc", "--devices", "cpu", "--model", f"tiny={checkpoint}"),
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(**settings))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: _ready(url), timeout=180, what="ditepose serve to be ready", interval=0.2,
                       gave_up=lambda: None if proc.poll() is None else f"exited {proc.returncode}",
                       on_timeout=lambda: log_path.read_text()[-3000:])
            yield url
        finally:
            stop_process(proc)


def has_video_routes(url: str) -> bool:
    """Whether the server answers ``POST /v1/videos`` (wp-V's branch merged)."""
    spec = httpx.get(f"{url}/openapi.json", headers={"X-API-Key": API_KEY}, timeout=30).json()
    return "/v1/videos" in spec.get("paths", {})
