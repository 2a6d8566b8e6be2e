"""Hostile images, boxes and options over REST and gRPC: each gets a clear 4xx (or a valid answer),
never a 5xx or a hang, and the worker keeps serving normal requests afterwards."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ditepose.proto.ditepose.v1 import pose_pb2
from ditepose.service.core.settings import ModelSpec, Settings
from tests.reliability.support import assert_error_shape, record, serve
from tests.service.conftest import encode, figure_image, post_pose
from tests.service.grpc.support import channel, config_message, frame_message, running_services, stub

KEY = "hostile-key-42"
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                derandomize=True)
TALLY: Counter[str] = Counter()
OK_IMAGE = encode(figure_image(160, 120))


@pytest.fixture(scope="module")
def services(tiny_ckpt: Path) -> Iterator[tuple]:
    s = Settings(_env_file=None, models=[ModelSpec(name="tiny", checkpoint=tiny_ckpt)], devices="cpu",
                 grpc_port=0, port=0, max_delay_ms=1.0, api_key=KEY, max_boxes=8,
                 max_upload_bytes=512 * 1024, max_image_pixels=4_000_000)
    with running_services(s) as (pool, app, grpc_server), serve(app) as url, \
            httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": KEY}) as client:
        yield client, grpc_server, pool
        # The worker survived everything: ready, and a normal request works.
        assert client.get("/readyz").status_code == 200
        assert post_pose(client, OK_IMAGE).status_code == 200
    record("hostile_input", "images, boxes, options (REST + gRPC)", cases=sum(TALLY.values()),
           server_errors=0, detail=", ".join(f"{k}: {v}" for k, v in sorted(TALLY.items())))


def _client(services: tuple) -> httpx.Client:
    return services[0]


def _expect_4xx_or_ok(response: httpx.Response, kind: str) -> None:
    TALLY[kind] += 1
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert 400 <= response.status_code < 500
        assert_error_shape(response)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, idat: bytes = b"") -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# ---------------------------------------------------------------- REST: fuzzed bytes
@given(data=st.binary(min_size=0, max_size=4096))
@FUZZ
def test_random_bytes(services: tuple, data: bytes) -> None:
    _expect_4xx_or_ok(post_pose(_client(services), data), "random bytes")


@given(cut=st.integers(min_value=1, max_value=len(OK_IMAGE) - 1), flip=st.integers(0, 255))
@FUZZ
def test_truncated_and_corrupted_jpeg(services: tuple, cut: int, flip: int) -> None:
    data = bytearray(OK_IMAGE[:cut])
    if len(data) > 20:
        data[len(data) // 2] ^= flip
    _expect_4xx_or_ok(post_pose(_client(services), bytes(data)), "truncated/corrupt jpeg")


JUNK = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**30, 10**30)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
NUM = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**20, 10**20)


@given(boxes=st.lists(st.lists(NUM, min_size=0, max_size=6), max_size=12) | JUNK,
       options=st.dictionaries(st.sampled_from(["model", "flip_test", "decoder", "score_threshold", "detector",
                                                "unknown", "boxes2"]), JUNK, max_size=4))
@FUZZ
def test_junk_boxes_and_options_json(services: tuple, boxes: object, options: dict) -> None:
    body = {"image": base64.b64encode(OK_IMAGE).decode(), "boxes": boxes, **options}
    text = json.dumps(body, allow_nan=True)  # NaN / Infinity literals too
    response = _client(services).post("/v1/pose", content=text, headers={"content-type": "application/json"})
    _expect_4xx_or_ok(response, "junk boxes/options")


def test_huge_box_lists_and_numbers(services: tuple) -> None:
    client = _client(services)
    for boxes, status in (([[0, 0, 10, 10]] * 10_000, 422), ([[1e300, 1e300, 1e300, 1e300]], 422),
                          ([[0, 0, 1e300, 1e300]], None), ([[-5, -5, 1e-30, 1e-30]], None),
                          ([["1", "2", "3", "4"]], None), ([[0, 0, -1, 5]], 422)):
        response = post_pose(client, OK_IMAGE, boxes=boxes)
        _expect_4xx_or_ok(response, "huge/odd boxes")
        if status is not None:
            assert response.status_code == status, (boxes[:1], response.text)


# ---------------------------------------------------------------- REST: crafted images
def test_decompression_bombs_are_refused_from_the_header(services: tuple) -> None:
    client = _client(services)
    response = post_pose(client, png_bomb(20000, 20000, zlib.compress(b"\x00" * 100_000)))
    assert_error_shape(response, 413)
    TALLY["decompression bomb"] += 1
    # 1x1 header with a huge compressed chunk (80 MB of zeros in ~80 kB): decodes 1 pixel at most.
    response = post_pose(client, png_bomb(1, 1, zlib.compress(b"\x00" * 80_000_000, 9)))
    _expect_4xx_or_ok(response, "decompression bomb")


@pytest.mark.parametrize("kind", ["1x1", "cmyk_jpeg", "png16", "gray", "rgba_png", "rgba_webp", "palette"])
def test_unusual_but_valid_images_are_served(services: tuple, kind: str) -> None:
    rgb = Image.fromarray(figure_image(96, 128))
    data = {
        "1x1": lambda: pil_bytes(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
        "cmyk_jpeg": lambda: pil_bytes(rgb.convert("CMYK"), "JPEG"),
        "png16": lambda: pil_bytes(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), "PNG"),
        "gray": lambda: pil_bytes(rgb.convert("L"), "JPEG"),
        "rgba_png": lambda: pil_bytes(rgb.convert("RGBA"), "PNG"),
        "rgba_webp": lambda: pil_bytes(rgb.convert("RGBA"), "WEBP"),
        "palette": lambda: pil_bytes(rgb.convert("P"), "PNG"),
    }[kind]()
    response = post_pose(_client(services), data)
    TALLY["unusual valid images"] += 1
    assert response.status_code == 200, response.text
    image = response.json()["image"]
    assert (image["width"], image["height"]) == ((1, 1) if kind == "1x1" else (96, 128))


def test_exif_rotation_is_applied_before_boxes_and_keypoints(services: tuple) -> None:
    """Orientation 6 (rotate 90 CW): a 160x120 file is a 120x160 image; boxes and keypoints use that."""
    stored = Image.fromarray(figure_image(160, 120))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = pil_bytes(stored, "JPEG", exif=exif.tobytes())
    client = _client(services)
    box = [10, 130, 100, 25]  # only inside the rotated 120x160 frame (y > 120)
    response = post_pose(client, data, boxes=[box])
    TALLY["exif rotation"] += 1
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["image"]["width"], body["image"]["height"]) == (120, 160)
    points = np.array([[k["x"], k["y"]] for k in body["persons"][0]["keypoints"]])
    assert points[:, 0].max() <= 120 + 60 and points[:, 1].min() >= 130 - 60  # near the rotated box
    # Without orientation the same box would lie outside the 160x120 frame.
    plain = post_pose(client, pil_bytes(stored, "JPEG"), boxes=[[10, 130, 100, 25]])
    assert_error_shape(plain, 422)


# ---------------------------------------------------------------- gRPC
GRPC_CASES = {
    "random bytes": (b"\x00\x01garbage", [], (grpc.StatusCode.INVALID_ARGUMENT,)),
    "empty": (b"", [], (grpc.StatusCode.INVALID_ARGUMENT,)),
    "bomb": (png_bomb(20000, 20000), [], (grpc.StatusCode.INVALID_ARGUMENT,)),
    "truncated": (OK_IMAGE[: len(OK_IMAGE) // 3], [], (grpc.StatusCode.INVALID_ARGUMENT,)),
    "nan box": (OK_IMAGE, [[float("nan"), 0, 10, 10]], (grpc.StatusCode.INVALID_ARGUMENT,)),
    "inf box": (OK_IMAGE, [[0, 0, float("inf"), 10]], (grpc.StatusCode.INVALID_ARGUMENT,)),
    "negative box": (OK_IMAGE, [[0, 0, -10, 10]], (grpc.StatusCode.INVALID_ARGUMENT,)),
    "too many boxes": (OK_IMAGE, [[0, 0, 10, 10]] * 500, (grpc.StatusCode.INVALID_ARGUMENT,)),
}


@pytest.mark.parametrize("case", sorted(GRPC_CASES))
def test_grpc_estimate_rejects_bad_frames(services: tuple, case: str) -> None:
    image, boxes, codes = GRPC_CASES[case]
    request = pose_pb2.EstimateRequest(image=image)
    for b in boxes:
        request.boxes.add(x=b[0], y=b[1], width=b[2], height=b[3])
    with channel(services[1]) as ch, pytest.raises(grpc.RpcError) as info:
        stub(ch).Estimate(request, metadata=(("x-api-key", KEY),), timeout=30)
    TALLY["gRPC unary"] += 1
    assert info.value.code() in codes, (info.value.code(), info.value.details())
    assert info.value.details()


def test_grpc_stream_survives_bad_frames(services: tuple) -> None:
    good = figure_image(160, 120)
    messages = [config_message()]
    for seq in range(12):
        msg = frame_message(seq, good, [[40, 10, 80, 100]])
        if seq % 3 == 1:
            msg.frame.image = b"not an image" if seq % 2 else OK_IMAGE[:50]
        if seq % 3 == 2:
            del msg.frame.boxes[:]
            msg.frame.boxes.add(x=float("nan"), y=0, width=10, height=10)
        messages.append(msg)
    with channel(services[1]) as ch:
        results = list(stub(ch).StreamPose(iter(messages), metadata=(("x-api-key", KEY),), timeout=60))
    TALLY["gRPC stream frames"] += len(messages) - 1
    errors = [r for r in results if r.HasField("error")]
    assert len(results) == 12 and len(errors) == 8
    assert {e.error.code for e in errors} <= {"not_an_image", "undecodable", "bad_boxes"}
