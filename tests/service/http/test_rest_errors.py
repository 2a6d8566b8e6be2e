"""Every failure answers ``{"error": {"code", "message"}}`` with a stable code and status."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import assert_error, encode, figure_image, post_pose, start_server

JPEG = encode(figure_image(seed=11))
BOX = [[200, 40, 240, 400]]


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width x height`` (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize(
    ("boxes", "why"),
    [
        ([[0, 0, 0, 10]], "zero width"),
        ([[0, 0, 10, -5]], "negative height"),
        ([[5000, 10, 50, 50]], "outside the image"),
        ([[-100, -100, 50, 50]], "outside the image"),
        ([[1, 2, 3]], "three numbers"),
        ([["a", 2, 3, 4]], "not numbers"),
        ([[0, 0, 10, 10]] * 9, "too many (limit 8)"),
        ({"x": 1}, "not a list"),
    ],
)
def test_bad_boxes(server, boxes, why):
    with server.client() as client:
        assert_error(post_pose(client, JPEG, boxes=boxes), 422, "bad_boxes")


def test_non_finite_boxes_in_json(server):
    # Python's JSON accepts NaN and Infinity literals, so the service must check them itself.
    image = base64.b64encode(JPEG).decode()
    for literal in ("NaN", "Infinity"):
        body = f'{{"image": "{image}", "boxes": [[10, 10, {literal}, 50]]}}'
        with server.client() as client:
            response = client.post("/v1/pose", content=body, headers={"content-type": "application/json"})
        assert_error(response, 422, "bad_boxes")


def test_boxes_not_json_in_multipart(server):
    with server.client() as client:
        response = client.post("/v1/pose", files={"image": ("a.jpg", JPEG)}, data={"boxes": "[[1,2"})
    assert_error(response, 422, "bad_boxes")


def test_not_an_image_and_undecodable(server):
    with server.client() as client:
        assert_error(post_pose(client, b"GIF89a not really"), 415, "not_an_image")
        assert_error(post_pose(client, b""), 415, "not_an_image")
        assert_error(post_pose(client, JPEG[: len(JPEG) // 3]), 422, "undecodable")
        gif = io.BytesIO()
        Image.new("RGB", (20, 20)).save(gif, format="GIF")
        assert_error(post_pose(client, gif.getvalue()), 415, "not_an_image")
        response = client.post("/v1/pose", content=JPEG, headers={"content-type": "text/plain"})
        assert_error(response, 415, "not_an_image")


def test_invalid_requests(server):
    with server.client() as client:
        assert_error(client.post("/v1/pose", json={"boxes": BOX}), 422, "invalid_request")
        assert_error(client.post("/v1/pose", json={"image": "***"}), 422, "invalid_request")
        assert_error(client.post("/v1/pose", json=[1, 2]), 422, "invalid_request")
        body = {"image": base64.b64encode(JPEG).decode(), "flip_test": "maybe"}
        assert_error(client.post("/v1/pose", json=body), 422, "invalid_request")
        assert_error(post_pose(client, JPEG, decoder="magic"), 422, "invalid_request")
        assert_error(post_pose(client, JPEG, detector="yolo"), 422, "invalid_request")
        assert_error(client.post("/v1/pose", data={"boxes": "[]"}, files={"x": ("a", b"1")}), 422, "invalid_request")
        assert_error(client.post("/v1/pose?render=gif", json={}), 422, "invalid_request")
        assert_error(client.get("/v1/nope"), 404, "not_found")
        assert_error(client.get("/v1/pose"), 405, "method_not_allowed")


def test_unknown_model(server):
    with server.client() as client:
        body = assert_error(post_pose(client, JPEG, boxes=BOX, model="resnet"), 404, "unknown_model")
    assert "hrnet18" in body["error"]["message"]


@pytest.fixture(scope="module")
def small_server():
    """Tight limits; the default model (the shipped checkpoint or random demo weights)."""
    with start_server(max_upload_bytes=64 * 1024, max_image_pixels=700 * 500, api_key="s3cret") as live:
        yield live


def test_api_key(small_server):
    with small_server.client() as client:
        assert_error(post_pose(client, JPEG, boxes=BOX), 401, "unauthorized")
        assert_error(client.get("/v1/models", headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        assert client.get("/healthz").status_code == 200  # probes need no key
        assert client.get("/metrics").status_code == 200
    with small_server.client(headers={"X-API-Key": "s3cret"}) as client:
        assert post_pose(client, JPEG, boxes=BOX).status_code == 200
        models = client.get("/v1/models").json()["models"]
    from ditepose import model
    assert models[0]["demo_weights"] is (model.default_checkpoint_path() is None)


def test_too_large(small_server):
    with small_server.client(headers={"X-API-Key": "s3cret"}) as client:
        big = encode(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8), ".png")
        assert len(big) > 64 * 1024
        assert_error(post_pose(client, big), 413, "too_large")  # Content-Length over the body limit
        bomb = _png_claiming_size(30000, 30000)
        assert len(bomb) < 200
        assert_error(post_pose(client, bomb), 413, "too_large")  # refused from the header alone
        wide = encode(np.zeros((10, 800, 3), np.uint8), ".png")
        assert post_pose(client, wide).status_code == 200  # 8000 px is fine
        assert_error(post_pose(client, encode(np.zeros((600, 600, 3), np.uint8))), 413, "too_large")

        def chunks():
            for _ in range(200):
                yield b"x" * 1024

        response = client.post("/v1/pose", content=chunks(), headers={"content-type": "application/json"})
        assert_error(response, 413, "too_large")  # no Content-Length: counted while streaming


def test_queue_full_answers_429_at_once():
    """A one-crop-per-batch worker with a 2-crop queue: concurrent requests overflow it. The in-flight
    limit is raised so that the queue's check sheds here (test_admission.py covers the earlier one)."""
    with start_server(max_batch_size=1, queue_size=2, max_delay_ms=0, max_in_flight=6) as live:
        boxes = [[200, 40, 240, 400], [100, 40, 200, 300]]  # 2 persons + flips = 4 crops each

        def call(_: int) -> tuple[int, float, dict, str | None]:
            started = time.perf_counter()
            with live.client() as client:
                response = post_pose(client, JPEG, boxes=boxes)
            return response.status_code, time.perf_counter() - started, response.json(), response.headers.get(
                "retry-after"
            )

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(call, range(6)))
        ok = [r for r in results if r[0] == 200]
        rejected = [r for r in results if r[0] == 429]
        assert ok and rejected, [r[0] for r in results]
        assert len(ok) + len(rejected) == len(results)
        for _status, _seconds, body, retry_after in rejected:
            assert body["error"]["code"] == "overloaded"
            assert retry_after == "1"
        assert max(r[1] for r in rejected) < min(r[1] for r in ok)  # refused without waiting
        with live.client() as client:
            metrics = client.get("/metrics").text
        assert 'ditepose_http_requests_total{method="POST",route="/v1/pose",status="429"}' in metrics
        queue_rejected = re.search(r'ditepose_queue_rejected_total\{model="[^"]+"\} ([0-9.e+]+)', metrics)
        assert queue_rejected and float(queue_rejected.group(1)) == len(rejected), metrics


def test_deadline_gives_504():
    with start_server(request_timeout_s=0.001) as live, live.client() as client:
        assert_error(post_pose(client, JPEG, boxes=BOX), 504, "timeout")
        ready = client.get("/readyz").json()
    assert ready["ready"] is True  # the worker survives requests that gave up


def test_unavailable_before_startup():
    """Without its lifespan (models not loaded yet) the app says so instead of crashing."""
    from ditepose.service.core.settings import Settings
    from ditepose.service.http.app import create_app

    app = create_app(Settings(_env_file=None))

    async def probe() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.get("/readyz"), await client.post("/v1/pose", files={"image": ("a", JPEG)})

    ready, pose = asyncio.run(probe())
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert_error(pose, 503, "unavailable")
