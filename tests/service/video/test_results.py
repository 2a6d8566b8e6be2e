"""Video results: the json shape of the issue, csv rows, COCO entries, all saying the same; weak
keypoints marked, not zeroed; the mp4 rendering."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from ditepose.model.keypoints import COCO
from ditepose.service.video.decode import decode_frames, probe
from ditepose.service.video.render import render_video
from ditepose.service.video.results import (
    CSV_COLUMNS,
    TrackSeries,
    VideoMeta,
    VideoResult,
    coco_entries,
    result_from_json,
    write_csv,
    write_result,
)
from ditepose.service.video.synthetic import CameraPath

JOINTS = COCO.num_joints


def make_track(track_id: int, frames: list[int], x0: float, fps: float = 30.0) -> TrackSeries:
    """A person walking right 2 px a frame; joint 3 is weak (score 0.1) on every frame."""
    n = len(frames)
    boxes = np.array([[x0 + 2 * f, 50.0, 40.0, 100.0] for f in frames])
    kpts = np.zeros((n, JOINTS, 3))
    kpts[:, :, 0] = boxes[:, :1] + np.linspace(5, 35, JOINTS)[None]
    kpts[:, :, 1] = 60.0 + 5.0 * np.arange(JOINTS)[None]
    kpts[:, :, 2] = 0.9
    kpts[:, 3, 2] = 0.1
    return TrackSeries(track_id, frames, [f / fps for f in frames], boxes, kpts,
                       ["detected" if f % 5 == 0 else "carried" for f in frames], [0.8] * n)


@pytest.fixture
def result() -> VideoResult:
    tracks = [make_track(1, list(range(0, 10)), 100.0), make_track(2, [2, 3, 4, 7, 8], 300.0)]
    return VideoResult(VideoMeta(30.0, 10, 640, 360, 10 / 30), "dite_hrnet_18", "sha256:abc", COCO.joint_names,
                       tracks, score_threshold=0.3)


def test_json_has_the_issue_shape_and_reads_back(result: VideoResult) -> None:
    data = json.loads(json.dumps(result.to_dict()))
    assert data["video"] == {"fps": 30.0, "frames": 10, "width": 640, "height": 360, "duration_s": 10 / 30}
    assert (data["model"], data["model_version"]) == ("dite_hrnet_18", "sha256:abc")
    track = data["tracks"][1]
    assert set(track) >= {"track_id", "frames", "timestamps", "boxes", "keypoints", "box_source"}
    assert track["frames"] == [2, 3, 4, 7, 8]
    assert len(track["keypoints"][0]) == JOINTS and len(track["keypoints"][0][0]) == 3
    assert track["box_source"][:2] == ["carried", "carried"]
    back = result_from_json(data)
    for a, b in zip(back.tracks, result.tracks, strict=True):
        assert a.frames == b.frames and a.timestamps == b.timestamps
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        np.testing.assert_array_equal(a.boxes, b.boxes)


def test_weak_keypoints_are_marked_not_zeroed(result: VideoResult) -> None:
    track = result.to_dict()["tracks"][0]
    assert track["visible"][0][3] is False and track["visible"][0][0] is True
    assert track["keypoints"][0][3][2] == pytest.approx(0.1)
    assert track["keypoints"][0][3][0] > 0 and track["keypoints"][0][3][1] > 0
    entry = coco_entries(result)[0]
    assert entry["keypoints"][3 * 3 + 2] == 1 and entry["keypoints"][2] == 2
    assert entry["keypoints"][3 * 3] > 0 and entry["keypoint_scores"][3] == pytest.approx(0.1)


def test_csv_coco_and_json_say_the_same(result: VideoResult) -> None:
    out = io.StringIO()
    write_csv(result, out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == (10 + 5) * JOINTS
    entries = coco_entries(result)
    assert len(entries) == 15
    assert [e["image_id"] for e in entries] == sorted(e["image_id"] for e in entries)
    tracks = {t["track_id"]: t for t in result.to_dict()["tracks"]}
    for entry in entries:
        track = tracks[entry["track_id"]]
        row = track["frames"].index(entry["image_id"])
        assert entry["bbox"] == track["boxes"][row]
        xy = np.array(entry["keypoints"]).reshape(-1, 3)[:, :2]
        np.testing.assert_array_equal(xy, np.array(track["keypoints"][row])[:, :2])
    for line in rows:
        track = tracks[int(line["track_id"])]
        row = track["frames"].index(int(line["frame"]))
        x, y, score = track["keypoints"][row][int(line["joint"])]
        assert (float(line["x"]), float(line["y"]), float(line["score"])) == (x, y, score)
        assert line["visible"] == str(int(score >= 0.3))
        assert line["box_source"] == track["box_source"][row]


def test_write_result_files(result: VideoResult, tmp_path: Path) -> None:
    for fmt in ("json", "csv", "coco"):
        path = write_result(result, tmp_path / f"out.{fmt}", fmt)
        assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="format"):
        write_result(result, tmp_path / "out.xml", "xml")


def test_columns_must_agree() -> None:
    with pytest.raises(ValueError, match="lengths"):
        TrackSeries(1, [0, 1], [0.0], np.zeros((2, 4)), np.zeros((2, JOINTS, 3)), ["detected"] * 2, [1.0] * 2)
    with pytest.raises(ValueError, match="increase"):
        TrackSeries(1, [1, 0], [0.0, 0.1], np.zeros((2, 4)), np.zeros((2, JOINTS, 3)), ["detected"] * 2, [1.0] * 2)


def test_a_track_selected_down_to_no_frames_keeps_its_joints() -> None:
    """The stitch appends a matched track's owned part, which may be empty (the track ended in the
    overlap); it must still concatenate with the track it continues (bench/video.py hit this)."""
    track = TrackSeries(1, [0, 1], [0.0, 0.1], np.zeros((2, 4)), np.zeros((2, JOINTS, 3)), ["detected"] * 2, [1.0] * 2)
    empty = track.select([False, False])
    assert empty.keypoints.shape == (0, JOINTS, 3)
    assert np.concatenate([track.keypoints, empty.keypoints]).shape == (2, JOINTS, 3)


def test_render_draws_on_every_frame(riders_clip: tuple[Path, CameraPath], tmp_path: Path) -> None:
    path = riders_clip[0]
    track = make_track(1, list(range(90)), 100.0)
    result = VideoResult(VideoMeta(30.0, 90, 640, 360, 3.0), "m", "v", COCO.joint_names, [track])
    out = render_video(path, result, COCO, tmp_path / "annotated.mp4")
    info = probe(out)
    assert (info.codec, info.frames, info.width, info.height) == ("h264", 90, 640, 360)
    assert info.fps == pytest.approx(30.0)
    source, drawn = next(decode_frames(path, 45, 46)), next(decode_frames(out, 45, 46))
    change = np.abs(source.image.astype(np.int32) - drawn.image.astype(np.int32)).max(axis=2)
    x, y, w, h = (round(v) for v in track.boxes[45])
    assert (change[y : y + h + 1, x : x + w + 1] > 60).sum() > 200  # skeleton and box drawn there
    assert (change[:, x + w + 40 :] > 60).mean() < 0.01  # the rest only re-encoded
