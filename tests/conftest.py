"""Shared test fixtures: where the read-only reference data lives."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared_dir() -> Path:
    """``../shared`` next to the repo root, falling back to /work/shared (worktrees)."""
    candidate = REPO_ROOT.parent / "shared"
    return candidate if candidate.is_dir() else Path("/work/shared")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = find_shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared fixtures not found at {path}")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
