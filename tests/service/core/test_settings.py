"""Settings from the environment, and ``ditepose serve`` as a real subprocess."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from ditepose.service.cli import parse_model_arg
from ditepose.service.core.settings import Settings
from tests.conftest import REPO_ROOT, python_cmd, subprocess_env
from tests.service.conftest import encode, figure_image


def test_settings_from_environment(monkeypatch, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("DITEPOSE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("DITEPOSE_DEVICES", "cpu")
    monkeypatch.setenv("DITEPOSE_MODELS", '[{"name": "a", "checkpoint": "x.pth"}, {"name": "b"}]')
    monkeypatch.setenv("DITEPOSE_API_KEY_FILE", str(key_file))
    settings = Settings(_env_file=None)
    assert settings.max_batch_size == 8
    assert [m.name for m in settings.models] == ["a", "b"] and settings.models[0].checkpoint == Path("x.pth")
    assert settings.default_model_name == "a"
    assert settings.resolved_api_key() == "from-file"
    assert settings.resolved_devices() == ["cpu"]
    assert Settings(_env_file=None, api_key=None, api_key_file=None).resolved_api_key() is None


@pytest.mark.parametrize(
    "bad",
    [{"devices": "tpu"}, {"models": []}, {"models": [{"name": "a"}, {"name": "a"}]}, {"default_model": "zz"}],
)
def test_settings_reject_bad_values(bad):
    with pytest.raises(ValueError):
        Settings(_env_file=None, **bad)


def test_model_flag_parsing():
    assert parse_model_arg("m=/w/a.pth") == {"name": "m", "checkpoint": "/w/a.pth"}
    assert parse_model_arg("m=a.pth:dite_hrnet_30") == {"name": "m", "checkpoint": "a.pth", "arch": "dite_hrnet_30"}
    with pytest.raises(ValueError):
        parse_model_arg("nothing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_a_request(hrnet18_checkpoint):
    port = _free_port()
    cmd = python_cmd("serve", "--port", str(port), "--no-grpc", "--model", f"ref={hrnet18_checkpoint}")
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        files = {"image": ("a.jpg", encode(figure_image()), "image/jpeg")}
        response = httpx.post(f"{url}/v1/pose", files=files, data={"boxes": "[[200,40,240,400]]"}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "ref" and len(response.json()["persons"][0]["keypoints"]) == 17
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"DitePose REST on http://127.0.0.1:{port}" in out
    assert "curl -F image=@" in out


def test_model_input_size_comes_from_checkpoint_or_override(reference_dir) -> None:
    """An authors' checkpoint carries no input size: the dataset default applies unless the spec names one."""
    import pytest as _pytest

    from ditepose.service.core.model_loader import load_model
    from ditepose.service.core.settings import ModelSpec

    ckpt = reference_dir / "dite_hrnet_18_coco_random.pth"
    assert load_model(ModelSpec(name="a", checkpoint=ckpt)).input_size == (192, 256)
    assert load_model(ModelSpec(name="b", checkpoint=ckpt, input_size=(288, 384))).input_size == (288, 384)
    with _pytest.raises(ValueError, match="multiples of 32"):
        load_model(ModelSpec(name="c", checkpoint=ckpt, input_size=(200, 250)))
