"""Unary gRPC against a real server on a loopback port, next to the REST app on the same pool."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ditepose.proto.ditepose.v1 import pose_pb2
from ditepose.service.grpc.convert import ERROR_CODE_METADATA, person_dict
from tests.service.grpc.support import channel, jpeg, make_settings, running_services, stub

COCO_IMAGE = "000000217285.jpg"
COCO_BOXES = [[261.96, 162.16, 107.47, 252.37], [510.82, 168.47, 73.07, 258.53], [376.37, 210.25, 98.39, 212.07]]


@pytest.fixture(scope="module")
def services(reference_dir: Path) -> Iterator[tuple]:
    settings = make_settings(reference_dir / "dite_hrnet_18_coco_random.pth", name="hrnet18", api_key="s3cret", max_boxes=8)
    with running_services(settings) as (pool, app, server), channel(server) as ch:
        yield pool, app, server, ch


def _meta() -> tuple:
    return (("x-api-key", "s3cret"),)


def _code(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get(ERROR_CODE_METADATA)


def test_unary_equals_rest_on_the_same_pool(services: tuple, coco_mini: Path) -> None:
    pool, app, _server, ch = services
    image = (coco_mini / "val2017" / COCO_IMAGE).read_bytes()
    request = pose_pb2.EstimateRequest(image=image, options=pose_pb2.PoseOptions(decoder="dark"))
    for b in COCO_BOXES:
        request.boxes.add(x=b[0], y=b[1], width=b[2], height=b[3])
    batches_before = sum(w.batches for w in pool.worker_status())
    reply = stub(ch).Estimate(request, metadata=_meta(), timeout=60)
    with TestClient(app) as client:
        rest = client.post(
            "/v1/pose",
            files={"image": ("a.jpg", image, "image/jpeg")},
            data={"boxes": json.dumps(COCO_BOXES), "decoder": "dark"},
            headers={"X-API-Key": "s3cret"},
        )
    assert rest.status_code == 200, rest.text
    body = rest.json()
    assert reply.model == body["model"] == "hrnet18"
    assert (reply.width, reply.height) == (body["image"]["width"], body["image"]["height"]) == (640, 427)
    grpc_persons = [{k: v for k, v in person_dict(p).items() if k != "track_id"} for p in reply.persons]
    assert len(grpc_persons) == 3
    assert grpc_persons == body["persons"]  # bit-identical: same pipeline, same model, same pool
    assert sum(w.batches for w in pool.worker_status()) > batches_before
    assert reply.timings.total_ms > 0


def test_list_models_and_health(services: tuple) -> None:
    ch = services[3]
    reply = stub(ch).ListModels(pose_pb2.ListModelsRequest(), metadata=_meta())
    assert [m.name for m in reply.models] == ["hrnet18"]
    info = reply.models[0]
    assert info.default and info.num_joints == 17 and (info.input_width, info.input_height) == (192, 256)
    assert info.joints[0] == "nose"
    health = health_pb2_grpc.HealthStub(ch)
    for name in ("", "ditepose.v1.PoseService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=name))  # no key needed
        assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("request_kwargs", "metadata", "status", "code"),
    [
        ({"image": b"not an image"}, True, grpc.StatusCode.INVALID_ARGUMENT, "not_an_image"),
        ({"boxes": [pose_pb2.Box(x=0, y=0, width=-5, height=10)]}, True, grpc.StatusCode.INVALID_ARGUMENT, "bad_boxes"),
        ({"options": pose_pb2.PoseOptions(model="nope")}, True, grpc.StatusCode.NOT_FOUND, "unknown_model"),
        ({"options": pose_pb2.PoseOptions(decoder="magic")}, True, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"),
        ({}, False, grpc.StatusCode.UNAUTHENTICATED, "unauthorized"),
    ],
)
def test_errors_map_to_status_codes(services: tuple, request_kwargs: dict, metadata: bool, status, code: str) -> None:
    import numpy as np

    ch = services[3]
    fields = {"image": jpeg(np.full((64, 48, 3), 128, np.uint8))}
    fields.update(request_kwargs)
    with pytest.raises(grpc.RpcError) as info:
        stub(ch).Estimate(pose_pb2.EstimateRequest(**fields), metadata=_meta() if metadata else None, timeout=30)
    assert info.value.code() == status
    assert _code(info.value) == code
    assert info.value.details()


def test_wrong_key_is_unauthenticated(services: tuple) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub(services[3]).ListModels(pose_pb2.ListModelsRequest(), metadata=(("x-api-key", "wrong"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_stream_needs_the_key_too(services: tuple) -> None:
    config = pose_pb2.StreamRequest(config=pose_pb2.StreamConfig())
    with pytest.raises(grpc.RpcError) as info:
        list(stub(services[3]).StreamPose(iter([config]), timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _code(info.value) == "unauthorized"
    replies = list(stub(services[3]).StreamPose(iter([config]), metadata=_meta(), timeout=30))
    assert replies == []  # a config and no frames: an empty, successful stream
