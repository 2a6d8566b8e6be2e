"""The served checkpoint's recorded quality, the same over REST (/v1/models) and gRPC (ListModels).

The shipped demo checkpoint must be named for what it is wherever a client lists models; a
checkpoint that records no evaluation says "not evaluated" instead of staying silent.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from ditepose.model.defaults import default_checkpoint_path
from ditepose.proto.ditepose.v1 import pose_pb2
from tests.service.grpc.support import channel, make_settings, running_services, stub, tiny_checkpoint


def _listed(checkpoint: Path) -> tuple[dict, pose_pb2.ModelQuality]:
    settings = make_settings(checkpoint, name="served")
    with running_services(settings) as (_pool, app, server), channel(server) as ch:
        with TestClient(app) as client:
            rest = client.get("/v1/models")
        reply = stub(ch).ListModels(pose_pb2.ListModelsRequest(), timeout=30)
    assert rest.status_code == 200, rest.text
    (model,) = rest.json()["models"]
    (info,) = reply.models
    return model["quality"], info.quality


def test_the_demo_checkpoint_says_it_is_not_usable_on_real_photos():
    path = default_checkpoint_path()
    assert path is not None
    rest, grpc_quality = _listed(path)
    assert rest["evaluated"] and rest["demo_checkpoint"] and rest["metric"] == "AP"
    assert 0.002 < rest["value"] < 0.0025  # AP 0.0023 on coco-mini val (tests/model/test_demo_checkpoint.py)
    assert "NOT usable on real photos" in rest["note"]
    assert grpc_quality.note == rest["note"] and grpc_quality.demo_checkpoint
    assert (grpc_quality.metric, grpc_quality.dataset, grpc_quality.boxes) == ("AP", rest["dataset"], "gt")
    assert abs(grpc_quality.value - rest["value"]) < 1e-12


def test_a_checkpoint_without_an_evaluation_says_not_evaluated(tmp_path):
    rest, grpc_quality = _listed(tiny_checkpoint(tmp_path / "tiny.pth"))
    assert not rest["evaluated"] and rest["note"].startswith("Not evaluated")
    assert not grpc_quality.evaluated and grpc_quality.note == rest["note"] and grpc_quality.metric == ""
