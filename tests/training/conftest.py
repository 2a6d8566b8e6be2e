"""Fixtures for the training tests: the real COCO slice in ../shared (falls back to /work/shared), tiny synthetic sets."""

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


# A Dite-HRNet-18 shrunk to seconds per step (model_overrides of a recipe).
TINY = {"num_modules": (1, 1, 1), "num_blocks": (1, 1, 1),
        "num_channels": ((16, 32), (16, 32, 64), (16, 32, 64, 128))}


def synth_set(tmp_path_factory: pytest.TempPathFactory, name: str, train: int, val: int, seed: int) -> Path:
    """A synthetic COCO-layout set: ``train`` training and ``val`` validation images."""
    from ditepose.training.synth import synthesize

    out = tmp_path_factory.mktemp(name)
    synthesize("coco", out, train, seed=seed)
    synthesize("coco", out, val, seed=seed + 1, split="val")
    return out
