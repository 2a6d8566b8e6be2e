"""bench/video.py's own arithmetic: the stage breakdown of one pass adds up, and the goal verdict names the
goal run and its dominant stage. The full run (Celery workers, every clip) is the bench itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import video
from ditepose.model.detectors import build_detector
from ditepose.service.video.offline import load_video_model
from ditepose.service.video.synthetic import RIDERS_PHOTO


@pytest.fixture(scope="module")
def short_pass(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> dict:
    """One pass over 6 riders frames: the demo checkpoint, the whole-image detector, every 3rd frame."""
    clip, _ = video.make_clip(tmp_path_factory.mktemp("bench"), RIDERS_PHOTO, 6, "riders")
    decode_s = video.decode_seconds(clip)
    return video.one_pass(clip, load_video_model(demo_checkpoint), build_detector("whole"), 3, False, decode_s)


def test_one_pass_reports_every_stage_and_they_add_up(short_pass: dict) -> None:
    share = short_pass["share"]
    assert short_pass["frames"] == 6 and short_pass["detector_calls"] == 2  # frames 0 and 3
    assert short_pass["crops_per_frame"] == 1.0 and short_pass["tracks"] == 1  # the whole image: one person
    assert all(share[k] >= 0 for k in share) and share["pose_network_s"] > 0
    assert sum(share.values()) == pytest.approx(short_pass["seconds"], abs=0.05)
    assert 0 < short_pass["first_result_s"] <= short_pass["seconds"]


def test_the_goal_verdict_takes_the_goal_run_and_its_largest_stage(short_pass: dict) -> None:
    goal_run = dict(short_pass, clip="three_people", detect_interval=5, flip_test=False, frames_per_s=5.0,
                    seconds=10.0, share={"detector_s": 1.0, "pose_network_s": 8.0, "decode_s": 0.5,
                                         "tracking_s": 0.1, "other_s": 0.4})
    other = dict(goal_run, flip_test=True, frames_per_s=50.0)
    verdict = video.goal_verdict([other, goal_run])
    assert verdict == {"frames_per_s": 5.0, "goal_frames_per_s": 25.0, "short_by_factor": 5.0,
                       "dominant_stage": "pose_network_s", "dominant_fraction": 0.8}
