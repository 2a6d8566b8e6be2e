"""Hypothesis strategies for hostile client input, shared by the REST and gRPC fuzz tests.

Each strategy aims at one parser: JSON text (junk values, deep nesting, broken syntax), multipart
bodies built byte by byte (odd names, headers, truncation), and image files whose header claims a
format (JPEG, PNG, WebP, GIF, BMP) with fuzzed dimensions and a random tail.
"""

from __future__ import annotations

import json
import struct
import zlib

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# derandomize: the examples are a function of the test's code, so CI and a laptop try the same
# inputs and a failure replays by rerunning the test (Hypothesis prints the falsifying example);
# no example database, whose entries would be written by CI runs and never travel back.
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

BOUNDARY = "fuzz-boundary-7d1"
OPTION_NAMES = ("model", "flip_test", "decoder", "score_threshold", "detector")
OPTION_VALUES = st.sampled_from(["", "tiny", "nope", "true", "false", "1", "0", "default", "dark", "unbiased",
                                 "argmax", "none", "whole", "hog", "nanodet", "NaN", "-inf", "1e308", "-1",
                                 "../../etc/passwd", "tiny\x00", "ｔｉｎｙ", "😀"])

JUNK = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**30, 10**30)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


def nested(depth: int, opener: str) -> str:
    """``depth`` levels of ``[`` or ``{"k":`` around 0, balanced."""
    if opener == "[":
        return "[" * depth + "0" + "]" * depth
    return '{"k":' * depth + "0" + "}" * depth


DEEP_JSON = st.builds(nested, st.integers(1, 20_000), st.sampled_from(["[", "{"]))
UNBALANCED_JSON = st.builds(lambda n, c: c * n, st.integers(1, 20_000), st.sampled_from(["[", "{", '{"a":[', "]"]))
JSON_TEXT = st.one_of(
    JUNK.map(lambda v: json.dumps(v, allow_nan=True)),
    DEEP_JSON,
    UNBALANCED_JSON,
    st.text(max_size=200),
    st.lists(st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**20, 10**20),
                      max_size=6), max_size=12).map(lambda v: json.dumps(v, allow_nan=True)),
)


def _png(width: int, height: int, depth: int, color: int, tail: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    chunk = b"IHDR" + header
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk
            + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF) + tail)


def _jpeg(width: int, height: int, components: int, tail: bytes) -> bytes:
    sof = struct.pack(">BHHB", 8, height, width, components) + b"\x01\x11\x00" * min(components, 4)
    app0 = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return (b"\xff\xd8\xff\xe0" + struct.pack(">H", len(app0) + 2) + app0
            + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + tail)


def _webp(kind: int, width: int, height: int, tail: bytes) -> bytes:
    if kind == 0:  # lossy VP8: frame tag, start code, 14-bit dimensions
        payload = b"\x9d\x01\x2a\x00" + struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
        chunk = b"VP8 " + struct.pack("<I", len(payload) + len(tail)) + payload
    elif kind == 1:  # lossless VP8L: signature byte, 14-bit width-1 and height-1
        bits = ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
        payload = b"\x2f" + struct.pack("<I", bits)
        chunk = b"VP8L" + struct.pack("<I", len(payload) + len(tail)) + payload
    else:  # extended VP8X: 24-bit canvas width-1 and height-1
        payload = b"\x10\x00\x00\x00" + ((width - 1) & 0xFFFFFF).to_bytes(3, "little") \
            + ((height - 1) & 0xFFFFFF).to_bytes(3, "little")
        chunk = b"VP8X" + struct.pack("<I", len(payload)) + payload
    body = b"WEBP" + chunk + tail
    return b"RIFF" + struct.pack("<I", len(body)) + body


DIMENSION = st.one_of(st.integers(0, 64), st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1))
TAIL = st.binary(max_size=512)
IMAGE_HEADERS = st.one_of(
    st.builds(_png, DIMENSION, DIMENSION, st.sampled_from([0, 1, 2, 4, 8, 16, 255]), st.integers(0, 255), TAIL),
    st.builds(_jpeg, DIMENSION.map(lambda v: v & 0xFFFF), DIMENSION.map(lambda v: v & 0xFFFF),
              st.integers(0, 255), TAIL),
    st.builds(_webp, st.integers(0, 2), DIMENSION, DIMENSION, TAIL),
    st.builds(lambda t: b"GIF89a" + t, TAIL),
    st.builds(lambda t: b"BM" + t, TAIL),
    st.binary(max_size=64),
)


HEADER_TEXT = st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=40)


@st.composite
def multipart_bodies(draw: st.DrawFn, image: bytes) -> bytes:
    """A multipart body of fuzzed parts (names, filenames, content types, values), sometimes the
    real ``image`` as a file part, sometimes cut short or without its closing boundary."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(["image", "boxes", *OPTION_NAMES, "extra"]) | HEADER_TEXT)
        disposition = f'form-data; name="{name}"'
        if draw(st.booleans()):
            disposition += f'; filename="{draw(HEADER_TEXT)}"'
        headers = f"Content-Disposition: {disposition}\r\n"
        if draw(st.booleans()):
            headers += f"Content-Type: {draw(st.sampled_from(['image/jpeg', 'text/plain', '']) | HEADER_TEXT)}\r\n"
        value = draw(st.one_of(OPTION_VALUES.map(str.encode), JSON_TEXT.map(str.encode), IMAGE_HEADERS,
                               st.just(image)))
        parts.append(f"--{BOUNDARY}\r\n{headers}\r\n".encode("latin-1") + value + b"\r\n")
    body = b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if draw(st.booleans()) else b"")
    if body and draw(st.integers(0, 4)) == 0:
        body = body[: draw(st.integers(0, len(body) - 1))]
    return body
