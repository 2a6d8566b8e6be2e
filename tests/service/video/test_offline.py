"""The offline video runner on the riders clip: NanoDet every 5th frame, carried boxes between,
the shipped demo checkpoint, the tracker. The demo checkpoint is poor on real photos, so the
tracks are judged by their boxes and ids (the camera path says where each rider is), not by
keypoint accuracy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from ditepose.model.detectors import NanoDetDetector
from ditepose.model.engines.select import openvino_missing
from ditepose.service.video.decode import probe, read_index
from ditepose.service.video.offline import (
    PoseModel,
    SegmentRunner,
    VideoCancelled,
    VideoOptions,
    finish_result,
    load_video_model,
    run_video,
)
from ditepose.service.video.results import TrackSeries, VideoResult, coco_entries, csv_rows
from ditepose.service.video.stitch import SegmentPlan, SegmentResult
from ditepose.service.video.synthetic import RIDER_BOXES, CameraPath
from ditepose.service.video.tracking import iou_matrix

OPTIONS = VideoOptions(detect_interval=5, flip_test=False)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One thread: on the shared 2-core machine two threads per process ran 6x slower (spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pose_model(demo_checkpoint: Path) -> PoseModel:
    return load_video_model(demo_checkpoint)


@pytest.fixture(scope="module")
def one_segment(riders_clip: tuple[Path, CameraPath], pose_model: PoseModel,
                nanodet: NanoDetDetector) -> SegmentResult:
    return SegmentRunner(pose_model, nanodet, OPTIONS).run(riders_clip[0], SegmentPlan(0, 0, 90))


@pytest.fixture(scope="module")
def single(riders_clip: tuple[Path, CameraPath], pose_model: PoseModel, one_segment: SegmentResult) -> VideoResult:
    return finish_result(probe(riders_clip[0]), [one_segment], pose_model, OPTIONS)


def follows(track: TrackSeries, rider_box: tuple[float, ...], camera: CameraPath) -> list[int]:
    """Frames where ``track``'s box is on the rider: IoU >= 0.4 with where the camera puts the
    rider's box, and that box's centre inside it."""
    out = []
    for row, frame in enumerate(track.frames):
        expected = camera.box_in_frame(rider_box, frame)
        box = track.boxes[row]
        cx, cy = expected[:2] + expected[2:] / 2
        inside = box[0] <= cx <= box[0] + box[2] and box[1] <= cy <= box[1] + box[3]
        if inside and iou_matrix(expected[None], box[None])[0, 0] >= 0.4:
            out.append(frame)
    return out


@pytest.mark.slow
def test_every_rider_is_one_track_that_follows_the_camera(single: VideoResult,
                                                          riders_clip: tuple[Path, CameraPath]) -> None:
    camera = riders_clip[1]
    assert single.video.frames == 90 and (single.video.width, single.video.height) == (640, 360)
    owners = []
    for rider_box in RIDER_BOXES:
        on_rider = {t.track_id: follows(t, rider_box, camera) for t in single.tracks}
        best = max(on_rider, key=lambda k: len(on_rider[k]))
        assert len(on_rider[best]) >= 0.9 * 90, on_rider
        assert sum(len(v) for k, v in on_rider.items() if k != best) <= 0.1 * 90  # no second id for the rider
        owners.append(best)
    assert len(set(owners)) == 2


@pytest.mark.slow
def test_detector_every_fifth_frame_boxes_carried_between(single: VideoResult) -> None:
    for track in single.tracks:
        for frame, source in zip(track.frames, track.box_source, strict=True):
            if frame % 5 == 0:
                assert source == "detected"
    sources = [s for t in single.tracks for s in t.box_source]
    assert sources.count("carried") >= 0.7 * len(sources)


@pytest.mark.slow
def test_three_segments_give_the_same_tracks(riders_clip: tuple[Path, CameraPath], pose_model: PoseModel,
                                             nanodet: NanoDetDetector, single: VideoResult) -> None:
    cut = run_video(riders_clip[0], pose_model, nanodet, OPTIONS, segment_frames=30)
    assert [t.track_id for t in cut.tracks] == [t.track_id for t in single.tracks]
    for a, b in zip(single.tracks, cut.tracks, strict=True):
        assert a.frames == b.frames and a.box_source == b.box_source
        np.testing.assert_allclose(b.keypoints, a.keypoints, atol=1e-6, rtol=0)
        np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_result_files_agree(single: VideoResult) -> None:
    persons = sum(len(t) for t in single.tracks)
    assert len(coco_entries(single)) == persons
    assert sum(1 for _ in csv_rows(single)) == persons * 17
    data = single.to_dict()
    assert [t["track_id"] for t in data["tracks"]] == sorted(t.track_id for t in single.tracks)
    assert all(t["timestamps"][0] == pytest.approx(t["frames"][0] / 30) for t in data["tracks"])


@pytest.mark.slow
def test_savgol_smooths_keypoints_only(riders_clip: tuple[Path, CameraPath], pose_model: PoseModel,
                                       one_segment: SegmentResult, single: VideoResult) -> None:
    options = VideoOptions(detect_interval=5, flip_test=False, smoothing="savgol")
    smooth = finish_result(probe(riders_clip[0]), [one_segment], pose_model, options)
    for a, b in zip(single.tracks, smooth.tracks, strict=True):
        assert a.frames == b.frames
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.keypoints[..., 2], b.keypoints[..., 2])
        assert not np.array_equal(a.keypoints, b.keypoints)


def test_progress_and_cancel(riders_clip: tuple[Path, CameraPath], pose_model: PoseModel,
                             nanodet: NanoDetDetector) -> None:
    seen: list[int] = []
    runner = SegmentRunner(pose_model, nanodet, OPTIONS)
    with pytest.raises(VideoCancelled):
        runner.run(riders_clip[0], SegmentPlan(40, 45, 60), read_index(riders_clip[0]), seen.append,
                   should_stop=lambda: len(seen) >= 3)
    assert seen == [40, 41, 42]


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="detect_interval"):
        VideoOptions(detect_interval=0)
    with pytest.raises(ValueError, match="smoothing"):
        VideoOptions(smoothing="kalman")  # type: ignore[arg-type]


@pytest.mark.skipif(openvino_missing() is not None, reason="OpenVINO (or onnx) is not installed")
def test_the_default_engine_is_openvino_and_agrees_with_the_torch_engine(
        riders_clip: tuple[Path, CameraPath], pose_model: PoseModel, nanodet: NanoDetDetector,
        demo_checkpoint: Path) -> None:
    """``load_video_model`` resolves its engine as the service does: OpenVINO where installed and agreeing;
    the same 30 frames on the torch engine give the same tracks and keypoints within a pixel."""
    assert type(pose_model.infer).__name__ == "OpenVinoEngine"
    on_torch = load_video_model(demo_checkpoint, engine="torch")
    assert type(on_torch.infer).__name__ != "OpenVinoEngine"
    plan = SegmentPlan(0, 0, 30)
    fast = SegmentRunner(pose_model, nanodet, OPTIONS).run(riders_clip[0], plan)
    reference = SegmentRunner(on_torch, nanodet, OPTIONS).run(riders_clip[0], plan)
    fast_tracks = finish_result(probe(riders_clip[0]), [fast], pose_model, OPTIONS).tracks
    torch_tracks = finish_result(probe(riders_clip[0]), [reference], on_torch, OPTIONS).tracks
    assert [t.frames for t in fast_tracks] == [t.frames for t in torch_tracks]
    for a, b in zip(fast_tracks, torch_tracks, strict=True):
        xy_a, xy_b = np.asarray(a.keypoints)[..., :2], np.asarray(b.keypoints)[..., :2]
        assert np.abs(xy_a - xy_b).max() <= 1.0
