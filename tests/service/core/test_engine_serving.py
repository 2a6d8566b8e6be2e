"""The service serving OpenVINO engines (issue 26): real uvicorn + gRPC, a real model repository.

The repository's model asks for ``engine: "openvino"`` in its manifest while the service's own
setting is ``torch``: the per-model option wins, /v1/models and gRPC ListModels show the backend,
precision, reason and agreement summary, a pose request is answered, and a hot swap to a new
version builds (and gates) OpenVINO engines again. The versions are the shipped demo checkpoint and
a copy with one output bias nudged (trained weights: OpenVINO fp32 agrees with the torch engine on
them). A flag model asking for OpenVINO bf16 on the authors' calibrated random weights is refused by
the agreement gate at the default bounds (their heatmaps are chaotic: even OpenVINO fp32 moves
6% of the joints there), which /v1/models reports under ``failed`` with the verdict, while the
other models serve.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
import torch

from ditepose.model.engines.select import openvino_missing
from ditepose.model.repository import ModelManifest, publish_version, write_manifest
from ditepose.proto.ditepose.v1 import pose_pb2, pose_pb2_grpc
from ditepose.service.core.settings import ModelSpec, Settings
from tests.service.conftest import post_pose
from tests.service.core.swap_support import (
    HEADERS,
    METADATA,
    figure_jpeg,
    model_entry,
    repository_settings,
    serving,
)

pytestmark = pytest.mark.skipif(openvino_missing() is not None, reason="openvino is not installed")


def _nudged_copy(checkpoint: Path, target: Path) -> None:
    """The demo checkpoint with the final layer's bias shifted by 1e-3: new weights, same behaviour."""
    data = torch.load(checkpoint, map_location="cpu", weights_only=False)
    bias = [key for key in data["state_dict"] if key.endswith("bias")][-1]
    data["state_dict"][bias] = data["state_dict"][bias] + 1e-3
    torch.save(data, target)


def test_engine_setting_reads_the_environment(monkeypatch):
    monkeypatch.setenv("DITEPOSE_ENGINE", "openvino")
    assert Settings(_env_file=None).engine == "openvino"
    monkeypatch.setenv("DITEPOSE_ENGINE", "tensorrt")
    with pytest.raises(ValueError, match="engine"):
        Settings(_env_file=None)


def test_openvino_serves_from_the_repository_swaps_and_refuses_bf16(tmp_path, demo_checkpoint, reference_dir):
    repository = tmp_path / "repository"
    model_dir = repository / "pose"
    write_manifest(model_dir, ModelManifest(engine="openvino"))
    publish_version(model_dir, lambda path: shutil.copyfile(demo_checkpoint, path))
    refused = ModelSpec(name="random_bf16", checkpoint=reference_dir / "dite_hrnet_18_coco_random.pth",
                        precision="bf16", engine="openvino")
    settings = repository_settings(repository, repository_poll_s=3600, engine="torch", models=[refused])
    image, box = figure_jpeg()
    with serving(settings) as (live, grpc_server), live.client(headers=HEADERS) as client:
        listed = client.get("/v1/models").json()
        assert "refused: openvino bf16" in listed["failed"]["random_bf16"]
        assert "moved more than 4 px" in listed["failed"]["random_bf16"]
        entry = model_entry(client, "pose")
        assert entry["options"]["engine"] == "openvino"
        cpu = entry["engines"]["cpu"]
        assert (cpu["backend"], cpu["precision"]) == ("openvino", "fp32")
        assert cpu["reason"] == "engine 'openvino' was asked for"
        assert cpu["agreement"]["passed"] and cpu["agreement"]["moved"] == 0 and cpu["agreement"]["joints"] == 340
        answer = post_pose(client, image, boxes=[box], model="pose")
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == "1" and len(answer.json()["persons"]) == 1

        _nudged_copy(demo_checkpoint, tmp_path / "v2.pth")
        publish_version(model_dir, lambda path: shutil.copyfile(tmp_path / "v2.pth", path))
        swapped = client.post("/v1/models/pose/reload").json()
        assert swapped["swapped"] is True and swapped["served_version"] == "2", swapped
        assert model_entry(client, "pose")["engines"]["cpu"]["backend"] == "openvino"
        again = post_pose(client, image, boxes=[box], model="pose")
        assert again.status_code == 200 and again.json()["model_version"] == "2"

        with grpc.insecure_channel(f"127.0.0.1:{grpc_server.port}") as channel:
            stub = pose_pb2_grpc.PoseServiceStub(channel)
            (info,) = stub.ListModels(pose_pb2.ListModelsRequest(), metadata=METADATA).models
            engine = info.engines["cpu"]
            assert (info.name, info.version, engine.backend, engine.precision) == ("pose", "2", "openvino", "fp32")
            assert engine.agreement.passed and engine.agreement.verdict.startswith("accepted: openvino fp32")
