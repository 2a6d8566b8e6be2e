"""The Dockerfiles, read: multi-stage, non-root, health check on a real route, only real files copied."""

from __future__ import annotations

import json
import shlex

import pytest

from ditepose.service.core.settings import Settings
from ditepose.service.http.app import create_app
from tests.conftest import REPO_ROOT
from tests.deploy.compose_support import DOCKERFILES, copy_sources, dockerfile_stages, dockerignored, urls_in


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request: pytest.FixtureRequest):
    return request.param


def _stage(dockerfile, name: str):
    (stage,) = [s for s in dockerfile_stages(dockerfile) if s.name == name]
    return stage


def _runs(stage) -> str:
    return " ".join(rest for kw, rest in stage.instructions if kw == "RUN")


def test_builder_installs_the_wheel_and_runtime_copies_only_the_venv_app_and_weights(dockerfile):
    stages = dockerfile_stages(dockerfile)
    names = [s.name for s in stages]
    # requirements (the dependency list as a file: the cache key of the big layers), deps (venv),
    # builder (weights + wheel), runtime last; the CUDA file first adds apt's python3 to its base.
    expected = ["requirements", "deps", "builder", "runtime"]
    assert names == (["python", *expected] if "cuda" in dockerfile.name else expected)
    deps, builder, runtime = _stage(dockerfile, "deps"), _stage(dockerfile, "builder"), stages[-1]
    assert builder.base == "deps"
    assert "torch==2.14.1" in _runs(deps) and "torchvision==0.29.1" in _runs(deps)
    assert "pip install -r /tmp/requirements.txt" in _runs(deps)
    assert (["/requirements.txt"], {"from": "requirements"}) in [copy_sources(r) for kw, r in deps.instructions
                                                                 if kw == "COPY"]
    runs = _runs(builder)
    assert "pip wheel" in runs and "ditepose-*.whl" in runs and "--target /opt/ditepose/app" in runs
    copies = [copy_sources(rest) for kw, rest in runtime.instructions if kw == "COPY"]
    from_stages = [(src, flags) for src, flags in copies if "from" in flags]
    assert from_stages == [(["/opt/venv"], {"from": "deps"}), (["/opt/ditepose/app"], {"from": "builder"}),
                           (["/opt/ditepose/weights"], {"from": "builder"})]
    # the wheel's files are on the venv's path (a .pth written with the venv) and its script on PATH
    assert "echo /opt/ditepose/app >" in _runs(deps) and ".pth" in _runs(deps)
    env = " ".join(rest for kw, rest in runtime.instructions if kw == "ENV")
    assert "PATH=/opt/ditepose/app/bin:/opt/venv/bin:$PATH" in shlex.split(env)
    # the person detector's weights are fetched (and checked) at build time, where the runtime looks
    assert "DITEPOSE_WEIGHTS_DIR=/opt/ditepose/weights ditepose weights fetch" in runs
    assert "DITEPOSE_WEIGHTS_DIR=/opt/ditepose/weights" in env
    # the demo checkpoint is checked to be inside the installed wheel
    assert "model/weights/*.pth" in runs
    # No source tree and no build tools in the runtime stage.
    runtime_runs = _runs(runtime)
    assert "pip install" not in runtime_runs and "build-essential" not in runtime_runs


def test_base_image_and_package_indexes_are_build_arguments(dockerfile):
    text = dockerfile.read_text()
    base_arg = "CUDA_IMAGE" if "cuda" in dockerfile.name else "PYTHON_IMAGE"
    before_first_from = text[: text.index("\nFROM ")]
    assert f"\nARG {base_arg}=" in before_first_from
    stages = dockerfile_stages(dockerfile)
    for i, stage in enumerate(stages):  # the base argument, or an earlier stage
        assert stage.base == f"${{{base_arg}}}" or stage.base in {s.name for s in stages[:i]}
    deps = _stage(dockerfile, "deps")
    args = {rest.split("=")[0] for kw, rest in deps.instructions if kw == "ARG"}
    assert {"TORCH_INDEX_URL", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"} <= args
    assert 'pip install --index-url "${TORCH_INDEX_URL}" torch==' in _runs(deps)
    # BuildKit would fetch a `# syntax=` frontend image from Docker Hub: none, so it builds offline
    assert "# syntax=" not in text


def test_runs_as_a_non_root_user(dockerfile):
    runtime = dockerfile_stages(dockerfile)[-1]
    users = [rest for kw, rest in runtime.instructions if kw == "USER"]
    assert users, "the runtime stage sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    keywords = [kw for kw, _ in runtime.instructions]
    # Nothing after USER runs as root again, and the user is created before it.
    assert "RUN" not in keywords[keywords.index("USER"):]
    assert any("useradd" in rest and users[-1] in rest for kw, rest in runtime.instructions if kw == "RUN")


def test_copies_only_what_the_repo_has_and_the_build_context_keeps(dockerfile):
    for stage in dockerfile_stages(dockerfile):
        for keyword, rest in stage.instructions:
            if keyword not in ("COPY", "ADD"):
                continue
            assert keyword == "COPY", "use COPY, not ADD"
            sources, flags = copy_sources(rest)
            if "from" in flags:
                continue
            for source in sources:
                path = REPO_ROOT / source
                assert path.exists(), f"{dockerfile.name} copies {source}, which the repo lacks"
                assert not dockerignored(source), f"{source} is excluded by .dockerignore"


def test_healthcheck_hits_healthz_with_python_and_ports_are_exposed(dockerfile):
    runtime = dockerfile_stages(dockerfile)[-1]
    (health,) = [rest for kw, rest in runtime.instructions if kw == "HEALTHCHECK"]
    cmd = json.loads(health.split("CMD", 1)[1])
    assert cmd[:2] == ["python", "-c"] and "urllib.request" in cmd[2]
    (url,) = urls_in(cmd[2].replace("%s", str(Settings.model_fields["port"].default)))
    app = create_app(Settings(_env_file=None, grpc_enabled=False))
    assert url["path"] in app.openapi()["paths"]
    exposed = {int(p) for kw, rest in runtime.instructions if kw == "EXPOSE" for p in rest.split()}
    assert {Settings.model_fields["port"].default, Settings.model_fields["grpc_port"].default, 9100} <= exposed
    (cmd_line,) = [rest for kw, rest in runtime.instructions if kw == "CMD"]
    assert json.loads(cmd_line)[:2] == ["ditepose", "serve"]


def test_weights_volume_and_bake_in_folder(dockerfile):
    runtime = dockerfile_stages(dockerfile)[-1]
    copies = [copy_sources(rest) for kw, rest in runtime.instructions if kw == "COPY"]
    assert (["docker/weights/"], {"chown": "ditepose:ditepose"}) in copies
    env = " ".join(rest for kw, rest in runtime.instructions if kw == "ENV")
    assert "DITEPOSE_CHECKPOINT_DIR=/models" in shlex.split(env)


def test_dockerignore_keeps_tests_and_secrets_out():
    for path in ("tests/deploy/test_compose.py", ".git/HEAD", "docker/secrets/api_key.txt", ".venv/bin/python",
                 "service/__pycache__/app.cpython-311.pyc", "models/ditehrnet_18_coco_256x192.pth", "data/coco/x.jpg"):
        assert dockerignored(path), path
    for path in ("service/app.py", "model/weights/x.pth", "pyproject.toml", "docker/weights/README.md",
                 "model/__init__.py"):
        assert not dockerignored(path), path


def test_every_package_of_the_wheel_is_copied_into_the_builder(dockerfile):
    import ast

    setup_py = ast.parse((REPO_ROOT / "setup.py").read_text())
    roots = next(ast.literal_eval(node.value) for node in setup_py.body
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "ROOTS")
    present = {"ditepose", *roots}  # the folders setup.py installs under the ditepose root
    builder = _stage(dockerfile, "builder")
    copied = {src.rstrip("/") for kw, rest in builder.instructions if kw == "COPY" for src in copy_sources(rest)[0]}
    assert present <= copied, f"{dockerfile.name} misses packages {sorted(present - copied)}"
    assert {"pyproject.toml", "setup.py", "README.md"} <= copied
