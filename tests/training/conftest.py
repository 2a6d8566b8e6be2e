"""Fixtures for the training tests: the real COCO slice in ../shared (falls back to /work/shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    for base in (REPO_ROOT.parent / "shared", Path("/work/shared")):
        path = base / "data" / "coco-mini"
        if (path / "annotations").is_dir():
            return path
    pytest.skip("../shared/data/coco-mini is not present")
    raise AssertionError("unreachable")
