"""Property-based fuzzing of every REST parser of untrusted input, over a real uvicorn on loopback:
multipart bodies, the ``boxes`` string, option values, JSON bodies of ``/v1/pose`` and
``/v1/evaluate``, and uploaded file headers. Every answer is 2xx or 4xx with the JSON error shape
naming the problem, the server logs no traceback, and it is still ready afterwards.

The budget is fixed (:data:`~tests.reliability.fuzz_strategies.FUZZ`: 40 derandomized examples a
test) so the file runs in well under two minutes on 2 cores.
"""

from __future__ import annotations

import base64
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ditepose.service.core.errors import ERROR_CODES
from ditepose.service.core.settings import ModelSpec, Settings
from tests.reliability.fuzz_strategies import (
    BOUNDARY,
    DEEP_JSON,
    FUZZ,
    IMAGE_HEADERS,
    JSON_TEXT,
    JUNK,
    OPTION_NAMES,
    OPTION_VALUES,
    multipart_bodies,
)
from tests.reliability.server_log import RecordList, server_log
from tests.reliability.support import record, serve
from tests.service.conftest import encode, figure_image, post_pose
from tests.service.grpc.support import running_services

IMAGE = encode(figure_image(160, 120))
BOX = [40, 10, 80, 100]
TALLY: Counter[str] = Counter()
# A detector whose weights are not cached answers 503 naming the command that fetches them: a
# deployment state, not a parser failure. Every other 5xx fails the test.
DETECTORS_WITH_WEIGHTS = ("nanodet", "torchvision")


@pytest.fixture(scope="module")
def live(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, RecordList]]:
    settings = Settings(_env_file=None, models=[ModelSpec(name="tiny", checkpoint=tiny_ckpt)], devices="cpu",
                        grpc_port=0, port=0, max_delay_ms=1.0, max_boxes=8, detector="whole",
                        max_upload_bytes=256 * 1024, max_image_pixels=4_000_000,
                        jobs_dir=tmp_path_factory.mktemp("jobs"))
    with server_log() as log, running_services(settings) as (_pool, app, _grpc), serve(app) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        yield client, log
        assert client.get("/readyz").status_code == 200
        assert post_pose(client, IMAGE, boxes=[BOX]).status_code == 200
        assert not log.tracebacks(), log.tracebacks()[:3]
        assert not [r for r in log.records if r.levelno >= logging.ERROR], [r.getMessage() for r in log.records][:5]
    record("hostile_input", "property-based fuzzing of the REST parsers", cases=sum(TALLY.values()),
           server_errors=0, detail=", ".join(f"{k}: {v}" for k, v in sorted(TALLY.items())))


def expect_clean(response: httpx.Response, kind: str, codes: set[str] | None = None) -> dict | None:
    """2xx, or a 4xx whose body is ``{"error": {"code", "message"}}`` with a known code (one of
    ``codes`` when given) and a message; returns the error."""
    TALLY[kind] += 1
    if response.status_code < 300:
        return None
    body = response.json()
    assert set(body) == {"error"}, (response.status_code, body)
    error = body["error"]
    assert error["code"] in ERROR_CODES and error["message"], body
    assert ERROR_CODES[error["code"]][0] == response.status_code, (response.status_code, body)
    if response.status_code == 503 and error["code"] == "unavailable":
        assert any(d in error["message"] for d in DETECTORS_WITH_WEIGHTS), body
        return error
    assert 400 <= response.status_code < 500, (response.status_code, body)
    if codes is not None:
        assert error["code"] in codes, (body, codes)
    return error


def post_json_text(client: httpx.Client, path: str, text: str) -> httpx.Response:
    """POST fuzzed text as a JSON body, byte for byte (lone surrogates included)."""
    return client.post(path, content=text.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"})


@given(body=multipart_bodies(IMAGE), render=st.sampled_from(["json", "png"]) | st.text(max_size=8))
@FUZZ
def test_multipart_bodies(live: tuple, body: bytes, render: str) -> None:
    client, _ = live
    response = client.post("/v1/pose", content=body, params={"render": render},
                           headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    expect_clean(response, "multipart bodies")


@given(boxes=JSON_TEXT)
@FUZZ
def test_boxes_string(live: tuple, boxes: str) -> None:
    client, _ = live
    response = client.post("/v1/pose", files={"image": ("a.jpg", IMAGE, "image/jpeg")}, data={"boxes": boxes})
    error = expect_clean(response, "boxes string", {"bad_boxes"})
    if error is not None:
        assert "box" in error["message"].lower(), error


@given(options=st.dictionaries(st.sampled_from(OPTION_NAMES), OPTION_VALUES, max_size=5))
@FUZZ
def test_option_values(live: tuple, options: dict[str, str]) -> None:
    client, _ = live
    response = client.post("/v1/pose", files={"image": ("a.jpg", IMAGE, "image/jpeg")},
                           data={"boxes": json.dumps([BOX]), **options})
    error = expect_clean(response, "option values", {"invalid_request", "unknown_model", "unavailable"})
    if error is not None and error["code"] == "invalid_request":
        assert any(name in error["message"] for name in options), (options, error)


JSON_BODIES = st.one_of(
    st.fixed_dictionaries({"image": st.just(base64.b64encode(IMAGE).decode()) | st.text(max_size=30) | JUNK},
                          optional={"boxes": JUNK, "model": JUNK, "flip_test": JUNK,
                                    "decoder": JUNK, "score_threshold": JUNK, "detector": JUNK, "extra": JUNK}
                          ).map(lambda v: json.dumps(v, allow_nan=True)),
    JSON_TEXT,
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    DEEP_JSON.map(lambda deep: '{"image":' + deep + "}"),
    DEEP_JSON.map(lambda deep: '{"image":"' + base64.b64encode(IMAGE).decode() + '","boxes":' + deep + "}"),
)



@given(text=JSON_BODIES)
@FUZZ
def test_pose_json_bodies(live: tuple, text: str) -> None:
    client, _ = live
    response = post_json_text(client, "/v1/pose", text)
    expect_clean(response, "pose JSON bodies")


@given(header=IMAGE_HEADERS, with_box=st.booleans())
@FUZZ
def test_uploaded_file_headers(live: tuple, header: bytes, with_box: bool) -> None:
    client, _ = live
    response = post_pose(client, header, **({"boxes": [BOX]} if with_box else {}))
    expect_clean(response, "file headers", {"not_an_image", "undecodable", "too_large", "bad_boxes"})


EVALUATE_BODIES = st.one_of(
    st.dictionaries(st.sampled_from(["dataset", "model", "checkpoint", "flip_test", "decoder", "boxes", "detector",
                                     "det_score_thr", "use_gt_boxes", "batch_size", "max_images", "shard_size",
                                     "ann_file"]), JUNK, max_size=6).map(lambda v: json.dumps(v, allow_nan=True)),
    JSON_TEXT,
    DEEP_JSON.map(lambda deep: '{"dataset":' + deep + "}"),
)


@given(text=EVALUATE_BODIES)
@FUZZ
def test_evaluate_json_bodies(live: tuple, text: str) -> None:
    client, _ = live
    response = post_json_text(client, "/v1/evaluate", text)
    assert response.status_code != 202, text  # no fuzzed body names a catalogue dataset
    expect_clean(response, "evaluate JSON bodies", {"invalid_request", "unknown_dataset", "unknown_model"})
