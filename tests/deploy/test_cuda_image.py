"""docker/Dockerfile.cuda, built for real and run without a GPU (this machine has none).

Its default base, nvidia/cuda (Ubuntu), cannot be pulled where no registry answers; the
Dockerfile needs only apt and python3 from its base (the torch CUDA wheels bring the CUDA
libraries), so it is then built on docker/build-base.sh's Debian python base, and the report
says so. What is checked: the multi-stage build, the non-root user, the weights and the demo
checkpoint inside, torch's CUDA build, and a pose served on the CPU. Not checked: a GPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.deploy.docker_support import (
    LOCAL_PYTHON_BASE,
    LOOPBACK,
    build_args,
    build_base_images,
    docker_missing,
    free_port,
    image_exists,
    image_size_mb,
    pull,
    run,
    served_indexes,
    wait_for,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(2400)]

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile.cuda"
IMAGE = "ditepose-test:cuda"


def test_cuda_dockerfile_builds_and_its_image_serves_without_a_gpu(deploy_report: list[str]) -> None:
    reason = docker_missing()
    if reason:
        pytest.skip(reason)
    build_base_images()
    (default_base,) = re.findall(r"^ARG CUDA_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    base = default_base
    if not image_exists(base) and not pull(base):
        base = LOCAL_PYTHON_BASE
        deploy_report.append(f"cuda image: {default_base} cannot be pulled; built on {base} instead (no GPU checks)")
    with served_indexes() as index_urls:
        args = {k: v for k, v in build_args(index_urls).items() if k != "PYTHON_IMAGE"}
        args["CUDA_IMAGE"] = base
        argv = ["docker", "build", "--network", "host", "--force-rm", "-q", "-f", str(DOCKERFILE), "-t", IMAGE]
        for key, value in args.items():
            argv += ["--build-arg", f"{key}={value}"]
        t0 = time.monotonic()
        run([*argv, str(REPO_ROOT)], timeout=2000)
        deploy_report.append(f"cuda image build ({DOCKERFILE.name} on {base}): {time.monotonic() - t0:.1f} s, "
                             f"{image_size_mb(IMAGE):.0f} MB")

    probe = ("import json, torch, ditepose.model.weight_store as w; "
             "print(json.dumps([torch.__version__, torch.version.cuda, torch.cuda.is_available(), "
             "w.problems(w.NANODET)]))")
    out = run(["docker", "run", "--rm", "--network", "host", IMAGE, "python", "-c", probe]).stdout
    version, cuda, available, problems = json.loads(out.strip().splitlines()[-1])
    assert version.startswith("2.14.1") and cuda, (version, cuda)  # torch's CUDA build
    assert available is False and problems == []  # no GPU here; the detector's weights are inside
    assert run(["docker", "run", "--rm", IMAGE, "id", "-un"]).stdout.strip() == "ditepose"

    port, grpc_port = free_port(), free_port()
    name = f"ditepose-test-cuda-{port}"
    run(["docker", "run", "-d", "--rm", "--name", name, "--network", "host", "-e", "DITEPOSE_TORCH_THREADS=1",
         IMAGE, "ditepose", "serve", "--host", LOOPBACK, "--port", str(port), "--grpc-port", str(grpc_port)])
    try:
        url = f"http://{LOOPBACK}:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 180, "the CUDA image's api to be ready",
                 on_timeout=lambda: run(["docker", "logs", name], check=False).stderr[-4000:])
        image = (REPO_ROOT / "docs" / "example.jpg").read_bytes()
        response = httpx.post(f"{url}/v1/pose", files={"image": ("example.jpg", image, "image/jpeg")},
                              data={"boxes": "[[200,31,129,185]]"}, timeout=120)
        assert response.status_code == 200, response.text
        assert len(response.json()["persons"]) == 1
        health = json.loads(run(["docker", "inspect", "-f", "{{json .Config.Healthcheck}}", name]).stdout)
        assert health["Test"][:3] == ["CMD", "python", "-c"]
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True)
