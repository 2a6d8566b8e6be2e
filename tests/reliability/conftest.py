"""Fixtures of the reliability suite; the session hook writes ``test-artifacts/reliability.json``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.reliability.support import RECORDS
from tests.service.grpc.support import tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dite-HRNet-18 at 64x64 with random weights in our format: real model, fast on 2 CPU cores."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture(scope="session")
def reliability_log() -> Iterator[list]:
    yield RECORDS


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not RECORDS:
        return
    out = REPO_ROOT / "test-artifacts" / "reliability.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()).get("records", []) if out.is_file() else []
    names = {(r["category"], r["name"]) for r in RECORDS}
    kept = [r for r in previous if (r["category"], r["name"]) not in names]
    out.write_text(json.dumps({"written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                               "exit_status": int(exitstatus), "records": kept + RECORDS}, indent=1))
