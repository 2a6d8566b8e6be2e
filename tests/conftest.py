"""Shared fixtures: where ../shared lives, and the reference data in it."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ditepose.model.detectors import NanoDetDetector

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared_dir() -> Path:
    """``../shared`` beside the repo (CI and the main checkout); worktrees fall back to /work/shared.

    ``DITEPOSE_SHARED_DIR`` comes first: the GPU machine gets only the repo, so bench/gpu_check.py
    points it at the carried copy (``.gpu/shared``)."""
    override = os.environ.get("DITEPOSE_SHARED_DIR")
    for candidate in (*([Path(override)] if override else []), REPO_ROOT.parent / "shared", Path("/work/shared")):
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


# ----------------------------------------------------------------------------- no silent skips
# `make test` sets DITEPOSE_REQUIRE_SYSTEM=1 (after scripts/ensure-system-deps installed or
# started what it could): a skip because a real component is missing (redis-server, chromium,
# the Docker engine, the shared data, ...) then fails the test instead. Run alone (plain
# `pytest tests/...`), such tests still skip. A new test that needs a system component skips
# with a reason saying it "is not installed", "is not present" or "is not running".
REQUIRE_SYSTEM_ENV = "DITEPOSE_REQUIRE_SYSTEM"
MISSING_SYSTEM_RE = re.compile(r"\b(is|are) not (installed|present|running|reachable)\b|\bnot on this branch\b")


def missing_system_component(reason: str) -> bool:
    """Whether a skip reason says a system component (package, engine, shared data) is missing."""
    return bool(MISSING_SYSTEM_RE.search(reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and os.environ.get(REQUIRE_SYSTEM_ENV) == "1"):
        return
    if hasattr(report, "wasxfail") or not isinstance(report.longrepr, tuple):
        return
    reason = str(report.longrepr[2])
    if missing_system_component(reason):
        report.outcome = "failed"
        report.longrepr = (f"{reason}\n{REQUIRE_SYSTEM_ENV}=1 (make test): a missing system component fails the "
                           "test instead of skipping it. Install it (scripts/ensure-system-deps does, as root), "
                           "or run `make test-reduced`.")


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


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The shipped demo checkpoint, for the tests that load or serve it (skipped where it is absent)."""
    from ditepose.model.defaults import default_checkpoint_path

    path = default_checkpoint_path()
    if path is None:
        pytest.skip("the shipped demo checkpoint model/weights/dite_hrnet_18_coco_demo.pth is not present")
    return Path(path)


@pytest.fixture(scope="session")
def nanodet() -> NanoDetDetector:
    """The service's default person detector, built once for the tests that run it."""
    from ditepose.model.detectors import build_detector
    from ditepose.model.weight_store import WeightsMissing

    try:
        return build_detector("nanodet")
    except WeightsMissing as exc:
        pytest.skip(f"NanoDet weights are not cached: {exc}")
