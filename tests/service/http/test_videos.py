"""POST /v1/videos end to end in embedded mode: real uvicorn, the serving pool, NanoDet, the demo checkpoint.

The video is the riders pan/zoom clip (:mod:`ditepose.service.video.synthetic`: a camera path over
docs/riders.jpg, 90 frames of H.264 through PyAV), so where each rider is on every frame is known.
The demo checkpoint is poor on real photos, so the tracks are judged by their ids and boxes (as
tests/service/video/test_offline.py does), and the four result formats against each other.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest

from ditepose.model.detectors import NanoDetDetector
from ditepose.service.core.settings import ModelSpec
from ditepose.service.video.decode import probe
from ditepose.service.video.results import CSV_COLUMNS, result_from_json
from ditepose.service.video.synthetic import RIDER_BOXES, CameraPath, riders_camera, write_riders_clip
from tests.reliability.support import sample_delta, scrape
from tests.service.conftest import LiveServer, assert_error, start_server
from tests.service.http.raw_http import BOUNDARY, start_upload
from tests.service.video.test_offline import follows
from tests.support import wait_until

pytestmark = pytest.mark.slow
MAX_UPLOAD = 2 * 1024 * 1024  # the riders clip is well under it


@pytest.fixture(scope="module")
def riders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CameraPath]:
    path = tmp_path_factory.mktemp("riders") / "riders.mp4"
    return path, write_riders_clip(path, gop=30)


@pytest.fixture(scope="module")
def live(demo_checkpoint: Path, nanodet: NanoDetDetector, riders: tuple[Path, CameraPath],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Embedded jobs (no Redis) on the serving pool; the riders clip is also the catalogue's 'riders'."""
    jobs_dir = tmp_path_factory.mktemp("jobs")
    with start_server(models=[ModelSpec(name="demo", checkpoint=demo_checkpoint)], jobs_dir=jobs_dir,
                      torch_threads=1, workers_per_device=1, video_max_upload_bytes=MAX_UPLOAD,
                      videos={"riders": riders[0]}) as server:
        yield server


def _upload(client: httpx.Client, data: bytes, name: str = "clip.mp4", **fields: str) -> httpx.Response:
    return client.post("/v1/videos", files={"video": (name, data, "video/mp4")}, data=fields)


def _finish(client: httpx.Client, job_id: str, seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = client.get(f"/v1/jobs/{job_id}").json()
        if seen is not None:
            seen.append(body)
        return body if body["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(done, timeout=600, interval=0.25, what=f"video job {job_id} to finish")


@pytest.fixture(scope="module")
def finished(live: LiveServer, riders: tuple[Path, CameraPath]) -> dict[str, Any]:
    """The riders clip uploaded with render on and no flip test; the job polled to its end."""
    with live.client() as client:
        response = _upload(client, riders[0].read_bytes(), flip_test="false", render="true")
        assert response.status_code == 202, response.text
        body = response.json()
        assert response.headers["location"] == body["location"] == f"/v1/jobs/{body['id']}"
        seen: list[dict[str, Any]] = []
        job = _finish(client, body["id"], seen)
        results = {fmt: client.get(f"/v1/jobs/{body['id']}/result", params={"format": fmt}) for fmt in
                   ("json", "csv", "coco", "mp4")}
    return {"job": job, "seen": seen, "results": results}


def test_every_rider_is_one_track_following_the_camera(finished: dict[str, Any],
                                                       riders: tuple[Path, CameraPath]) -> None:
    job = finished["job"]
    assert job["state"] == "succeeded", job["error"]
    assert job["kind"] == "video" and job["frames_total"] == job["frames_done"] == 90
    assert job["result_url"] == f"/v1/jobs/{job['id']}/result" and job["progress"] == 100.0
    running = [b for b in finished["seen"] if b["state"] == "running"]
    assert [b["frames_done"] for b in running] == sorted(b["frames_done"] for b in running)  # never backwards
    response = finished["results"]["json"]
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    result = response.json()
    assert result["video"]["frames"] == 90 and (result["video"]["width"], result["video"]["height"]) == (640, 360)
    assert result["model"] == "demo" and result["model_version"].startswith("sha256:")
    camera = riders[1]
    tracks = result_from_json(result).tracks
    for rider_box in RIDER_BOXES:
        on_rider = {t.track_id: follows(t, rider_box, camera) for t in tracks}
        owner = max(on_rider, key=lambda k: len(on_rider[k]))
        # one id on at least 90% of the frames, with a box where the camera path puts the rider
        assert len(on_rider[owner]) >= 81, {k: len(v) for k, v in on_rider.items()}
        others = [f for k, frames in on_rider.items() if k != owner for f in frames]
        assert len(others) <= 9, on_rider


def test_csv_coco_and_mp4_say_what_json_says(finished: dict[str, Any]) -> None:
    results = finished["results"]
    result = results["json"].json()
    joints = len(result["joints"])
    rows = list(csv.reader(io.StringIO(results["csv"].text)))
    assert tuple(rows[0]) == CSV_COLUMNS and results["csv"].headers["content-type"].startswith("text/csv")
    by_key = {(int(r[0]), int(r[1]), int(r[3])): r for r in rows[1:]}
    assert len(rows) - 1 == len(by_key) == sum(len(t["frames"]) for t in result["tracks"]) * joints
    coco = {(e["track_id"], e["image_id"]): e for e in results["coco"].json()}
    thr = result["score_threshold"]
    for track in result["tracks"]:
        for row, frame in enumerate(track["frames"]):
            kpts = np.array(track["keypoints"][row])
            csv_kpts = np.array([[float(by_key[(track["track_id"], frame, j)][c]) for c in (5, 6, 7)]
                                 for j in range(joints)])
            np.testing.assert_allclose(csv_kpts, kpts, rtol=0, atol=1e-9)
            entry = coco[(track["track_id"], frame)]
            flat = np.array(entry["keypoints"]).reshape(-1, 3)
            np.testing.assert_allclose(flat[:, :2], kpts[:, :2], atol=1e-9)
            assert flat[:, 2].tolist() == [2 if s >= thr else 1 for s in kpts[:, 2]]  # marked, never zeroed
            assert entry["bbox"] == track["boxes"][row]
    assert len(coco) == sum(len(t["frames"]) for t in result["tracks"])
    mp4 = results["mp4"]
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
    rendered = io.BytesIO(mp4.content)
    with av.open(rendered) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert (frames, stream.codec_context.width, stream.codec_context.height) == (90, 640, 360)


def _zero_frame_video(path: Path) -> bytes:
    """A Matroska file with an H.264 stream header and not one frame (an MP4 written so has no
    video stream at all for FFmpeg: that one is 415, a container without video)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return path.read_bytes()


def _video_folders(live: LiveServer) -> list[str]:
    root = Path(live.app.state.context.settings.jobs_dir) / "videos"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_bad_input_is_a_4xx_json_error_and_leaves_nothing_behind(
    live: LiveServer, finished: dict[str, Any], riders: tuple[Path, CameraPath], tmp_path: Path
) -> None:
    clip = riders[0].read_bytes()
    with live.client() as client:
        before = [j["id"] for j in client.get("/v1/jobs").json()["jobs"]]
        folders = _video_folders(live)
        cases = [
            (_upload(client, b"just some text, not a video at all\n" * 50, "notes.txt"), 415, "unsupported_media"),
            (_upload(client, clip[: len(clip) // 3]), 422, "invalid_video"),  # cut before its index (moov)
            (_upload(client, _zero_frame_video(tmp_path / "empty.mkv")), 422, "invalid_video"),
            (_upload(client, clip[:32] + b"\0" * (MAX_UPLOAD + 1024)), 413, "too_large"),
            (client.post("/v1/videos", json={"video": "no-such-video"}), 404, "unknown_video"),
            (client.post("/v1/videos", json={"video": "../riders"}), 422, "invalid_request"),
            (_upload(client, clip, smoothing="kalman"), 422, "invalid_request"),
            (client.post("/v1/videos", files={"video": ("c.mp4", clip, "video/mp4"),
                                              "options": (None, '{"detect_interval": [[[[1]]]]}')}),
             422, "invalid_request"),
            (client.post("/v1/videos", content=b"x" * 10, headers={"content-type": "text/plain"}),
             415, "unsupported_media"),
        ]
        for response, status, code in cases:
            assert_error(response, status, code)
        assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == before  # no job from bad input
        assert _video_folders(live) == folders  # no upload left on disk, no empty job folder
        assert client.get("/readyz").status_code == 200
        assert_error(client.get(f"/v1/jobs/{finished['job']['id']}/result", params={"format": "gif"}),
                     422, "invalid_request")


def test_catalogue_video_runs_and_cancel_stops_it(live: LiveServer) -> None:
    with live.client() as client:
        response = client.post("/v1/videos", json={"video": "riders", "flip_test": True, "detect_interval": 1})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert_error(client.get(f"/v1/jobs/{job_id}/result"), 409, "not_ready")
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["frames_done"] >= 2, timeout=300,
                   interval=0.1, what="the catalogue video's job to be under way")
        cancelled = client.delete(f"/v1/jobs/{job_id}").json()
        assert cancelled["state"] in ("running", "cancelled") and cancelled["cancel_requested"]
        done = _finish(client, job_id)
        assert done["state"] == "cancelled" and done["result_url"] is None
        assert done["frames_done"] < 90 and done["request"]["video"] == "riders"
        assert_error(client.get(f"/v1/jobs/{job_id}/result"), 409, "not_ready")
        # the service still serves after it
        assert client.get("/readyz").status_code == 200


def test_mp4_of_a_job_without_render_is_not_rendered(live: LiveServer, riders: tuple[Path, CameraPath]) -> None:
    """Options as one JSON part; savgol smoothing; mp4 asked of a job that did not render."""
    short = riders[0].parent / "short.mp4"
    write_riders_clip(short, riders_camera(frames=12), gop=12)
    assert probe(short).frames == 12
    with live.client() as client:
        response = client.post("/v1/videos", files={"video": ("s.mp4", short.read_bytes(), "video/mp4"),
                                                    "options": (None, json.dumps({"flip_test": False,
                                                                                  "smoothing": "savgol"}))})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        job = _finish(client, job_id)
        assert job["state"] == "succeeded", job["error"]
        assert job["request"]["smoothing"] == "savgol"
        assert_error(client.get(f"/v1/jobs/{job_id}/result", params={"format": "mp4"}), 404, "not_rendered")
        assert client.get(f"/v1/jobs/{job_id}/result", params={"format": "json"}).json()["video"]["frames"] == 12


def test_a_client_gone_mid_upload_leaves_no_file_and_no_job(live: LiveServer,
                                                            riders: tuple[Path, CameraPath]) -> None:
    """Headers declare the whole clip, a third of it is sent, the socket closes: the partial file
    is deleted, no job appears, the next upload is served."""
    clip = riders[0].read_bytes()
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"r.mp4\"\r\n"
            "Content-Type: video/mp4\r\n\r\n").encode()
    with live.client() as client:
        before = [j["id"] for j in client.get("/v1/jobs").json()["jobs"]]
        folders = _video_folders(live)
        metrics = scrape(live.url)
        start_upload(live.url, declared_bytes=len(head) + len(clip) + 64, sent=head + clip[: len(clip) // 3],
                     path="/v1/videos").close()
        wait_until(lambda: sample_delta(metrics, scrape(live.url), "ditepose_client_disconnects_total",
                                        route="/v1/videos") == 1, timeout=30, what="the server to see the hang-up")
        root = Path(live.app.state.context.settings.jobs_dir) / "videos"
        assert not list(root.glob(".upload-*"))  # the partial upload was written, then deleted
        assert _video_folders(live) == folders
        assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == before
        assert client.get("/readyz").status_code == 200
