"""Shared fixtures: where ../shared lives, and the reference data in it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared_dir() -> Path:
    """``../shared`` beside the repo (CI and the main checkout); worktrees fall back to /work/shared."""
    for candidate in (REPO_ROOT.parent / "shared", Path("/work/shared")):
        if (candidate / "fixtures" / "reference").is_dir():
            return candidate
    pytest.skip("../shared/fixtures/reference is not present")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return find_shared_dir()


@pytest.fixture(scope="session")
def reference_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "reference"


@pytest.fixture(scope="session")
def coco_mini(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "coco-mini"
    if not path.is_dir():
        pytest.skip("../shared/data/coco-mini is not present")
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes of ours: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def python_cmd(*args: str) -> list[str]:
    """``python -m ditepose ARGS`` with this interpreter: the ``ditepose`` command, from this checkout."""
    return [sys.executable, "-m", "ditepose", *args]


def stop_process_group(proc, grace_s: float = 20.0) -> None:
    """SIGTERM a child started with ``start_new_session=True`` and its children; SIGKILL if it lingers."""
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def stop_process(proc, grace_s: float = 20.0) -> None:
    """Terminate a child server, kill it if it does not exit within ``grace_s``."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
