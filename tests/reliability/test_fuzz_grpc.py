"""Property-based fuzzing of the gRPC parsers over a real server on loopback: ``EstimateRequest``
(image headers, boxes of any doubles, every option) and ``StreamConfig`` (options, policy values
outside the enum, limits, tracking and smoothing numbers) followed by frames. Every call ends OK or
with a status other than INTERNAL/UNKNOWN whose details say what was wrong; the server logs no
traceback and still answers afterwards. Budget: :data:`~tests.reliability.fuzz_strategies.FUZZ`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ditepose.proto.ditepose.v1 import pose_pb2
from ditepose.service.core.settings import ModelSpec, Settings
from tests.reliability.fuzz_strategies import FUZZ, IMAGE_HEADERS, OPTION_VALUES
from tests.reliability.server_log import RecordList, server_log
from tests.reliability.support import record
from tests.service.conftest import encode, figure_image
from tests.service.grpc.support import channel, frame_message, running_services, stub

IMAGE = encode(figure_image(160, 120))
BOX = [40.0, 10.0, 80.0, 100.0]
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
TALLY: Counter[str] = Counter()

DOUBLE = st.floats(allow_nan=True, allow_infinity=True, width=64)
UINT32 = st.one_of(st.integers(0, 16), st.integers(0, 2**32 - 1))
# Valid values often enough that the parsers past the first check are reached too.
NUMBER = st.floats(0.0, 1.0) | DOUBLE
REAL_OR_FUZZED_IMAGE = st.booleans().flatmap(lambda real: st.just(IMAGE) if real else IMAGE_HEADERS)
BOXES = st.one_of(st.just([tuple(BOX)]), st.just([]), st.lists(st.tuples(DOUBLE, DOUBLE, DOUBLE, DOUBLE), max_size=12))


@pytest.fixture(scope="module")
def live(tiny_ckpt: Path) -> Iterator[tuple[grpc.Channel, RecordList]]:
    settings = Settings(_env_file=None, models=[ModelSpec(name="tiny", checkpoint=tiny_ckpt)], devices="cpu",
                        grpc_port=0, port=0, max_delay_ms=1.0, max_boxes=8, detector="whole",
                        max_upload_bytes=256 * 1024, max_image_pixels=4_000_000)
    with server_log() as log, running_services(settings) as (_pool, _app, server), channel(server) as ch:
        yield ch, log
        answer = stub(ch).Estimate(_estimate(IMAGE, [tuple(BOX)], {}), timeout=30)
        assert len(answer.persons) == 1
        assert not log.tracebacks(), log.tracebacks()[:3]
        assert not [r for r in log.records if r.levelno >= logging.ERROR], [r.getMessage() for r in log.records][:5]
    record("hostile_input", "property-based fuzzing of the gRPC messages",
           cases=TALLY["EstimateRequest"] + TALLY["StreamConfig"],
           server_errors=0, detail=", ".join(f"{k}: {v}" for k, v in sorted(TALLY.items())))


FUZZED_OPTIONS = st.fixed_dictionaries({}, optional={
    "model": OPTION_VALUES | st.text(max_size=30), "flip_test": st.booleans(),
    "decoder": OPTION_VALUES | st.text(max_size=10), "score_threshold": DOUBLE,
    "detector": OPTION_VALUES | st.text(max_size=10),
})
OPTIONS = st.booleans().flatmap(lambda plain: st.just({}) if plain else FUZZED_OPTIONS)


def _estimate(image: bytes, boxes: list[tuple[float, ...]], options: dict) -> pose_pb2.EstimateRequest:
    request = pose_pb2.EstimateRequest(image=image, options=pose_pb2.PoseOptions(**options))
    for x, y, w, h in boxes:
        request.boxes.add(x=x, y=y, width=w, height=h)
    return request


def expect_clean(error: grpc.RpcError | None, kind: str) -> None:
    """No error, or a client-side status (not a server fault) with details."""
    TALLY[kind] += 1
    if error is None:
        return
    assert error.code() not in SERVER_FAULTS, (error.code(), error.details())
    assert error.details(), error.code()
    if error.code() == grpc.StatusCode.UNAVAILABLE:  # only a detector without its cached weights
        assert "nanodet" in error.details() or "torchvision" in error.details(), error.details()


@given(image=REAL_OR_FUZZED_IMAGE, boxes=BOXES, options=OPTIONS)
@FUZZ
def test_estimate_requests(live: tuple, image: bytes, boxes: list, options: dict) -> None:
    ch, _ = live
    try:
        stub(ch).Estimate(_estimate(image, boxes, options), timeout=30)
    except grpc.RpcError as exc:
        expect_clean(exc, "EstimateRequest")
    else:
        expect_clean(None, "EstimateRequest")
        TALLY["EstimateRequest served"] += 1


STREAM_CONFIGS = st.builds(
    lambda options, policy, in_flight, queued, tracking, smoothing, interval: pose_pb2.StreamConfig(
        options=pose_pb2.PoseOptions(**options), policy=policy, max_in_flight=in_flight, max_queued=queued,
        tracking=pose_pb2.TrackingConfig(enabled=tracking[0], min_similarity=tracking[1], max_age=tracking[2]),
        smoothing=pose_pb2.SmoothingConfig(enabled=smoothing[0], min_cutoff=smoothing[1], beta=smoothing[2],
                                           d_cutoff=smoothing[3]),
        detect_interval=interval),
    OPTIONS, st.sampled_from([0, 1]) | st.integers(-(2**31), 2**31 - 1), UINT32, UINT32, st.tuples(st.booleans(), NUMBER, UINT32),
    st.tuples(st.booleans(), NUMBER, NUMBER, NUMBER), UINT32,
)


@given(config=STREAM_CONFIGS, frames=st.lists(st.sampled_from(["boxed", "unboxed", "garbage"]), min_size=1,
                                               max_size=3))
@FUZZ
def test_stream_configs(live: tuple, config: pose_pb2.StreamConfig, frames: list[str]) -> None:
    ch, _ = live
    messages = [pose_pb2.StreamRequest(config=config)]
    for seq, kind in enumerate(frames):
        message = frame_message(seq, figure_image(160, 120), [BOX] if kind == "boxed" else None)
        if kind == "garbage":
            message.frame.image = b"\xff\xd8\xff garbage"
        messages.append(message)
    try:
        results = list(stub(ch).StreamPose(iter(messages), timeout=60))
    except grpc.RpcError as exc:
        expect_clean(exc, "StreamConfig")
        return
    expect_clean(None, "StreamConfig")
    TALLY["StreamConfig served"] += 1
    assert len(results) + sum(len(r.dropped_sequence_numbers) for r in results) >= 1
    for result in results:
        if result.HasField("error"):
            assert result.error.code and result.error.message, result
