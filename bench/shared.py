"""Where the benches find ``../shared`` (the reference fixtures and small data sets).

``../shared`` beside the repository, as the tests read it; a checkout elsewhere (a worktree, a
temporary clone) falls back to ``/work/shared``. None when neither exists: benches then build
what they need (random weights, random inputs) and say so.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """``DITEPOSE_SHARED_DIR`` when set (the GPU machine's carried copy), else ``../shared``, else /work/shared."""
    override = os.environ.get("DITEPOSE_SHARED_DIR")
    for candidate in (*([Path(override)] if override else []), REPO_ROOT.parent / "shared", Path("/work/shared")):
        if candidate.is_dir():
            return candidate
    return None


def shared_file(*parts: str) -> Path | None:
    """``shared_dir() / parts`` when that file or folder exists, else None."""
    base = shared_dir()
    path = base.joinpath(*parts) if base is not None else None
    return path if path is not None and path.exists() else None
