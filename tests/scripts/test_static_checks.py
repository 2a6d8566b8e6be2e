"""The layer contracts of pyproject.toml hold, and they can fail: a probe module that breaks one is caught.

``scripts/static_checks.py imports`` is what ``make lint`` and CI run. These tests run it on the
working tree (it must pass) and on a copy of the package with one forbidden import added per
contract (each must fail, naming the broken contract), so a contract that could never fail, or a
layout the tool cannot read, shows here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "static_checks.py"
PACKAGE_FOLDERS = ("ditepose", "model", "training", "service", "proto")

# (where the probe goes, what it imports, the contract name import-linter must report broken)
BROKEN_LAYERS = [
    ("model/_probe.py", "import ditepose.training.evaluate", "model knows neither training"),
    ("training/_probe.py", "import ditepose.service.core.settings", "training knows neither the service"),
    ("service/core/_probe.py", "import fastapi", "know no transport"),
    ("service/video/_probe.py", "import grpc", "know no transport"),
    ("service/http/_probe.py", "import ditepose.service.grpc.server", "the transports import core"),
    ("service/batching/_probe.py", "import ditepose.service.core.pose_service", "service layers"),
    ("client.py", "import ditepose.service.core.settings", "the REST client"),  # replaces the copy's client
]


def run_imports_check(tree: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(SCRIPT), "imports"] + (["--tree", str(tree)] if tree else [])
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)


def copy_package(target: Path) -> Path:
    """A physical ``target/ditepose`` laid out as installed (the four folders as sub-packages)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "static", "weights", "fixtures")
    package = target / "ditepose"
    shutil.copytree(REPO / "ditepose", package, ignore=ignore)
    for name in PACKAGE_FOLDERS[1:]:
        shutil.copytree(REPO / name, package / name, ignore=ignore)
    return target


def test_working_tree_keeps_every_contract():
    result = run_imports_check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("probe", "statement", "contract"), BROKEN_LAYERS,
                         ids=[p for p, _, _ in BROKEN_LAYERS])
def test_a_forbidden_import_breaks_its_contract(tmp_path, probe, statement, contract):
    tree = copy_package(tmp_path)
    (tree / "ditepose" / probe).write_text(f'"""A probe that breaks a layer on purpose."""\n{statement}\n')
    result = run_imports_check(tree)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken.replace("\n", " "), result.stdout
    assert f"ditepose.{probe[:-3].replace('/', '.')}" in result.stdout
