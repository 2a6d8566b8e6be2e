"""The distribution claims one top-level import name, and a user's ``model.py`` cannot break it."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, stop_process_group
from tests.service.jobs.support import free_port

USER_FILES = ("model.py", "service.py", "training.py", "proto.py")


def test_no_module_imports_a_bare_top_level_folder() -> None:
    """Every import goes through ``ditepose.``: a bare ``import model`` would only work from the repo root."""
    offenders = []
    for folder in ("ditepose", "model", "training", "service", "proto", "bench", "tests", "docs"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                offenders += [f"{path.relative_to(REPO_ROOT)}: {n}" for n in names
                              if n.split(".")[0] in ("model", "service", "training", "proto")]
    assert not offenders, offenders


@pytest.mark.slow
def test_wheel_has_one_top_level_name_and_serves_beside_a_users_model_py(tmp_path: Path) -> None:
    # Built from a copy of the sources, so setuptools' build/ folder never lands in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "ditepose", "model", "training", "service", "proto"):
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy2
        copy(REPO_ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                   if (REPO_ROOT / name).is_dir() else {}))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, cwd=tmp_path)
    wheel = next(wheels.glob("ditepose-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert archive.read(top_level).decode().split() == ["ditepose"]
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"ditepose"}
    for package in ("model", "training", "service", "proto"):
        assert f"ditepose/{package}/__init__.py" in names, package
    assert "ditepose/model/weights/dite_hrnet_18_coco_demo.pth" in names
    assert any(n.startswith("ditepose/service/http/static/") for n in names)

    # A clean venv holding only this wheel; its dependencies come from ours through a .pth file
    # (paths only: the .pth files of our site-packages, the editable install among them, do not run).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "ditepose-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True)
    installed = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and p.name != "__pycache__"}
    assert installed == {"ditepose"}, installed

    # The user's working directory shadows generic names; `python -m` puts it first on sys.path.
    work = tmp_path / "work"
    work.mkdir()
    for name in USER_FILES:
        (work / name).write_text(f'raise ImportError("the user\'s {name} was imported")\n')
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(python), "-m", "ditepose", "serve", "--port", str(port), "--no-grpc",
                             "--workers-per-device", "1"], cwd=work, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["models"]
        assert models[0]["checkpoint"].endswith("dite_hrnet_18_coco_demo.pth")
        assert str(site) in models[0]["checkpoint"]  # the installed copy, not this checkout
        image = (REPO_ROOT / "docs" / "example.jpg").read_bytes()
        reply = httpx.post(f"{url}/v1/pose", files={"image": ("a.jpg", image, "image/jpeg")},
                           data={"boxes": "[[200,31,129,185]]"}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["persons"]) == 1
    finally:
        stop_process_group(proc)
        log.close()
    assert "was imported" not in (tmp_path / "serve.log").read_text()
