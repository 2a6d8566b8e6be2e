"""``ditepose.client`` against a real ``ditepose serve`` process: pose with and without boxes, the
error mapping, the jobs, and a video job from upload to every result format.

One server for the module (tests/serve_support.py: a subprocess on loopback, REST only, embedded
jobs, the tiny random checkpoint, the whole-image detector so "no boxes" is one known box, an API
key so the key header is exercised on every call).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from ditepose.client import ApiError, DitePoseClient, Job, PoseResult, VideoJobOptions
from ditepose.service.video.decode import probe
from ditepose.service.video.results import CSV_COLUMNS
from ditepose.service.video.synthetic import pattern_frames, riders_camera, write_riders_clip
from tests.serve_support import API_KEY, VIDEO_ROUTES_MISSING, has_video_routes, tiny_server
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


# ---------------------------------------------------------------------------------------------- video jobs
VIDEO_FRAMES = 12


@pytest.fixture(scope="module")
def riders_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "riders12.mp4"
    write_riders_clip(path, riders_camera(frames=VIDEO_FRAMES), gop=6)
    return path


@pytest.fixture(scope="module")
def video_server(tmp_path_factory: pytest.TempPathFactory, riders_clip: Path) -> Iterator[str]:
    """A server whose catalogue names the riders clip "riders"."""
    with tiny_server(tmp_path_factory.mktemp("videoserver"),
                     DITEPOSE_VIDEOS=json.dumps({"riders": str(riders_clip)})) as url:
        if not has_video_routes(url):
            pytest.skip(VIDEO_ROUTES_MISSING)
        yield url


@pytest.fixture(scope="module")
def finished_video_job(video_server: str, riders_clip: Path) -> tuple[Job, list[Job]]:
    """An uploaded riders clip, rendered, run to the end: (the final job, every job the polls saw)."""
    seen: list[Job] = []
    with DitePoseClient(video_server, api_key=API_KEY) as api:
        accepted = api.submit_video(riders_clip, VideoJobOptions(detect_interval=4, flip_test=False, render=True,
                                                                 smoothing="savgol"))
        assert accepted.location == f"/v1/jobs/{accepted.id}" and accepted.state == "queued"
        job = api.wait(accepted.id, on_progress=seen.append, poll_s=0.1, timeout=300)
    return job, seen


def test_a_video_job_runs_to_the_end_with_frame_progress(finished_video_job: tuple[Job, list[Job]]) -> None:
    job, seen = finished_video_job
    assert job.state == "succeeded", job.error
    assert (job.kind, job.frames_done, job.frames_total, job.progress) == ("video", VIDEO_FRAMES, VIDEO_FRAMES, 100.0)
    assert job.result_url == f"/v1/jobs/{job.id}/result"
    assert seen[-1] == job and all(j.kind == "video" and j.frames_total == VIDEO_FRAMES for j in seen)
    done = [j.frames_done or 0 for j in seen]
    assert done == sorted(done), "progress never goes back"


def test_every_result_format_agrees(video_server: str, finished_video_job: tuple[Job, list[Job]],
                                    tmp_path: Path) -> None:
    job, _ = finished_video_job
    with DitePoseClient(video_server, api_key=API_KEY) as api:
        tracks = api.result(job.id)
        coco = api.result(job.id, "coco")
        csv_text = api.result(job.id, "csv").decode()
        mp4 = api.download_result(job.id, "mp4", tmp_path / "annotated.mp4")
        csv_file = api.download_result(job.id, "csv", tmp_path / "tracks.csv")
    assert tracks["video"]["frames"] == VIDEO_FRAMES and tracks["model"] == "tiny"
    persons = sum(len(t["frames"]) for t in tracks["tracks"])
    assert persons == VIDEO_FRAMES  # the whole-image detector: one person on every frame
    assert len(coco) == persons and {e["image_id"] for e in coco} == set(range(VIDEO_FRAMES))
    rows = list(csv.reader(io.StringIO(csv_text)))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) - 1 == persons * len(tracks["joints"])
    assert csv_file.read_text() == csv_text and not csv_file.with_name("tracks.csv.part").exists()
    assert probe(mp4).frames == VIDEO_FRAMES


def test_jobs_lists_the_video_job_and_a_finished_job_cannot_be_cancelled(
        video_server: str, finished_video_job: tuple[Job, list[Job]]) -> None:
    job, _ = finished_video_job
    with DitePoseClient(video_server, api_key=API_KEY) as api:
        assert job.id in {j.id for j in api.jobs() if j.kind == "video"}
        with pytest.raises(ApiError) as caught:
            api.cancel(job.id)
    assert (caught.value.status, caught.value.code) == (409, "job_finished")


def test_a_catalogue_video_by_name(video_server: str) -> None:
    with DitePoseClient(video_server, api_key=API_KEY) as api:
        accepted = api.submit_catalogue_video("riders", VideoJobOptions(detect_interval=6, flip_test=False))
        job = api.wait(accepted.id, poll_s=0.1, timeout=300)
        assert job.state == "succeeded", job.error
        assert api.result(job.id)["video"]["frames"] == VIDEO_FRAMES
        with pytest.raises(ApiError) as caught:
            api.result(job.id, "mp4")
    assert (caught.value.status, caught.value.code) == (404, "not_rendered")


@pytest.mark.parametrize(("make", "status", "code"), [
    (lambda folder: _write(folder / "notes.mp4", b"plain text, not a video\n" * 10), 415, "unsupported_media"),
    (lambda folder: _half_of(folder, "riders12.mp4"), 422, "invalid_video"),  # an MP4 signature, no index
    (lambda folder: _frames_cut_off(folder), 422, "invalid_video"),
], ids=["text-file", "truncated-mp4", "no-decodable-frame"])
def test_a_bad_upload_is_refused_with_its_code(video_server: str, tmp_path: Path, make, status: int,
                                               code: str) -> None:
    with DitePoseClient(video_server, api_key=API_KEY) as api, pytest.raises(ApiError) as caught:
        api.submit_video(make(tmp_path))
    assert (caught.value.status, caught.value.code) == (status, code)


def test_bad_options_and_unknown_names_are_refused(video_server: str, riders_clip: Path) -> None:
    with DitePoseClient(video_server, api_key=API_KEY) as api:
        with pytest.raises(ApiError) as caught:
            api.submit_catalogue_video("no-such-video")
        assert (caught.value.status, caught.value.code) == (404, "unknown_video")
        with pytest.raises(ApiError) as caught:
            api.submit_video(riders_clip, VideoJobOptions(model="no-such-model"))
        assert (caught.value.status, caught.value.code) == (404, "unknown_model")
        with pytest.raises(ApiError) as caught:
            api.submit_video(riders_clip, VideoJobOptions(detect_interval=0))
        assert (caught.value.status, caught.value.code) == (422, "invalid_request")
        with pytest.raises(ApiError) as caught:
            api.result("no-such-job")
        assert (caught.value.status, caught.value.code) == (404, "unknown_job")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _half_of(folder: Path, name: str) -> Path:
    """The first half of a riders clip: its index (moov, written last) is gone: no container left."""
    write_riders_clip(folder / name, riders_camera(frames=4), gop=2)
    data = (folder / name).read_bytes()
    return _write(folder / "half.mp4", data[: len(data) // 2])


def _frames_cut_off(folder: Path) -> Path:
    """An MP4 whose index (moov first) promises frames whose data is cut off: a container, no frame."""
    path = folder / "whole.mp4"
    container = av.open(str(path), mode="w", options={"movflags": "faststart"})
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
    for image in pattern_frames(6):
        container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
    container.mux(stream.encode(None))
    container.close()
    data = path.read_bytes()
    return _write(folder / "no_frames.mp4", data[: data.find(b"mdat") + 20])
