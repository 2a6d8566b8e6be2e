"""``ditepose.client`` against a real ``ditepose serve`` process: pose with and without boxes, the
error mapping, the jobs, and a video job from upload to every result format.

One server for the module (tests/serve_support.py: a subprocess on loopback, REST only, embedded
jobs, the tiny random checkpoint, the whole-image detector so "no boxes" is one known box, an API
key so the key header is exercised on every call).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from ditepose.client import ApiError, DitePoseClient, Job, PoseResult, VideoJobOptions
from tests.serve_support import API_KEY, tiny_server
from tests.support import free_port


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tiny_server(tmp_path_factory.mktemp("client")) as url:
        yield url


@pytest.fixture
def api(base_url: str) -> Iterator[DitePoseClient]:
    with DitePoseClient(base_url, api_key=API_KEY) as client:
        yield client


def _jpeg(width: int = 320, height: int = 240) -> bytes:
    image = np.full((height, width, 3), 180, np.uint8)
    cv2.rectangle(image, (120, 40), (200, 220), (40, 40, 160), -1)
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    return buf.tobytes()


def test_pose_without_boxes_uses_the_servers_detector(api: DitePoseClient) -> None:
    result = api.pose(_jpeg())
    assert isinstance(result, PoseResult)
    assert (result.model, result.width, result.height) == ("tiny", 320, 240)
    assert len(result.persons) == 1  # the whole-image detector: one box, the image
    person = result.persons[0]
    assert person.bbox == pytest.approx((0.0, 0.0, 320.0, 240.0))
    assert len(person.keypoints) == 17 and person.keypoints[0].name == "nose"
    assert result.model_version and result.timings["total_ms"] > 0


def test_pose_with_boxes_and_options_from_a_path(api: DitePoseClient, tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg())
    boxes = [[110.0, 30.0, 100.0, 200.0], [10.0, 10.0, 50.0, 60.0]]
    result = api.pose(path, boxes, model="tiny", flip_test=False, decoder="argmax")
    assert [p.bbox for p in result.persons] == [pytest.approx(tuple(b)) for b in boxes]
    for person in result.persons:  # in its crop: the box made square (64x64 input), 1.25x, plus a heatmap cell
        x, y, w, h = person.bbox
        reach = 0.625 * max(w, h) * (1 + 2 / 16)
        assert all(abs(k.x - (x + w / 2)) <= reach and abs(k.y - (y + h / 2)) <= reach for k in person.keypoints), [(k.x, k.y) for k in person.keypoints]


@pytest.mark.parametrize(("call", "status", "code"), [
    (lambda api: api.pose(_jpeg(), model="no-such-model"), 404, "unknown_model"),
    (lambda api: api.pose(b"plain text, not an image"), 415, "not_an_image"),
    (lambda api: api.pose(_jpeg(), [[10.0, 10.0, 0.0, 50.0]]), 422, "bad_boxes"),
    (lambda api: api.pose(_jpeg(), score_threshold=float("nan")), 422, "invalid_request"),
    (lambda api: api.job("no-such-job"), 404, "unknown_job"),
], ids=["unknown-model", "not-an-image", "bad-boxes", "nan-threshold", "unknown-job"])
def test_service_errors_become_one_api_error_with_status_code_and_message(
        api: DitePoseClient, call, status: int, code: str) -> None:
    with pytest.raises(ApiError) as caught:
        call(api)
    assert (caught.value.status, caught.value.code) == (status, code)
    assert caught.value.message


def test_a_missing_or_wrong_api_key_is_unauthorized(base_url: str) -> None:
    for key in (None, "wrong"):
        with DitePoseClient(base_url, api_key=key) as client, pytest.raises(ApiError) as caught:
            client.pose(_jpeg())
        assert (caught.value.status, caught.value.code) == (401, "unauthorized")


def test_no_server_is_an_api_error_without_status() -> None:
    with DitePoseClient(f"http://127.0.0.1:{free_port()}") as client, pytest.raises(ApiError) as caught:
        client.jobs()
    assert (caught.value.status, caught.value.code) == (0, "unreachable")


def test_jobs_lists_and_cancel_of_an_unknown_job(api: DitePoseClient) -> None:
    assert all(isinstance(j, Job) for j in api.jobs(limit=5))
    with pytest.raises(ApiError) as caught:
        api.cancel("no-such-job")
    assert caught.value.code == "unknown_job"


def test_result_format_is_checked_before_sending(api: DitePoseClient) -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        api.result("any", "xml")  # type: ignore[call-overload]


def test_video_options_send_only_what_was_given() -> None:
    assert VideoJobOptions().to_json() == {}
    assert VideoJobOptions(detect_interval=3, flip_test=False, smoothing="savgol").to_json() == \
        {"detect_interval": 3, "flip_test": False, "smoothing": "savgol"}
