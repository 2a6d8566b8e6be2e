"""``ditepose video``: a short riders clip in, json/csv/coco files out that agree; locally and with --server.

The runs are real subprocesses (``python -m ditepose video``): locally with the shipped demo
checkpoint and NanoDet, and against a real ``ditepose serve`` (tests/serve_support.py), whose
files must equal a local run's with the same checkpoint and detector. The bad-input cases run the
parser in this process (no model is loaded for them).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ditepose.cli import main
from ditepose.client import DitePoseClient
from ditepose.model.detectors import NanoDetDetector
from ditepose.service.cli.video import ProgressBar
from ditepose.service.video.decode import probe
from ditepose.service.video.results import CSV_COLUMNS
from ditepose.service.video.synthetic import riders_camera, write_riders_clip
from tests.conftest import REPO_ROOT, python_cmd, subprocess_env
from tests.serve_support import API_KEY, VIDEO_ROUTES_MISSING, has_video_routes, tiny_server
from tests.support import wait_until

FRAMES = 8


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "riders8.mp4"
    write_riders_clip(path, riders_camera(frames=FRAMES), gop=4)
    return path


@pytest.fixture(scope="module")
def local_run(short_clip: Path, demo_checkpoint: Path, nanodet: NanoDetDetector,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict], list[dict], str]:
    """One local run writing all three files: (json result, csv rows, coco entries, stderr)."""
    out = tmp_path_factory.mktemp("out")
    proc = subprocess.run(
        python_cmd("video", str(short_clip), "--out", str(out / "t.json"), "--csv", str(out / "t.csv"),
                   "--coco", str(out / "t.coco.json"), "--no-flip", "--detect-interval", "4",
                   "--checkpoint", str(demo_checkpoint)),
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with (out / "t.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return (json.loads((out / "t.json").read_text()), rows, json.loads((out / "t.coco.json").read_text()),
            proc.stderr)


def test_local_run_finds_both_riders_with_one_track_each(local_run: tuple[dict, list[dict], list[dict], str]) -> None:
    result, _, _, stderr = local_run
    assert result["video"]["frames"] == FRAMES
    assert (result["video"]["width"], result["video"]["height"]) == (640, 360)
    long_tracks = [t for t in result["tracks"] if len(t["frames"]) == FRAMES]
    assert len(long_tracks) == 2, [(t["track_id"], t["frames"]) for t in result["tracks"]]
    assert f"{FRAMES}/{FRAMES} frames" in stderr  # the progress bar reached the end


def test_csv_has_one_row_per_track_frame_and_joint_matching_the_json(
        local_run: tuple[dict, list[dict], list[dict], str]) -> None:
    result, rows, _, _ = local_run
    joints = len(result["joints"])
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert len(rows) == sum(len(t["frames"]) for t in result["tracks"]) * joints
    by_key = {(int(r["track_id"]), int(r["frame"]), int(r["joint"])): r for r in rows}
    for track in result["tracks"]:
        for row, frame in enumerate(track["frames"]):
            for joint, (x, y, score) in enumerate(track["keypoints"][row]):
                found = by_key[(track["track_id"], frame, joint)]
                assert (float(found["x"]), float(found["y"]), float(found["score"])) == pytest.approx((x, y, score))
                assert found["visible"] == str(int(track["visible"][row][joint]))
                assert found["box_source"] == track["box_source"][row]


def test_coco_has_one_entry_per_person_and_frame_matching_the_json(
        local_run: tuple[dict, list[dict], list[dict], str]) -> None:
    result, _, coco, _ = local_run
    assert len(coco) == sum(len(t["frames"]) for t in result["tracks"])
    tracks = {t["track_id"]: t for t in result["tracks"]}
    for entry in coco:
        track = tracks[entry["track_id"]]
        row = track["frames"].index(entry["image_id"])
        assert entry["category_id"] == 1
        assert entry["bbox"] == pytest.approx(track["boxes"][row])
        flat = entry["keypoints"]
        for joint, (x, y, score) in enumerate(track["keypoints"][row]):
            assert flat[3 * joint: 3 * joint + 2] == pytest.approx([x, y])
            assert flat[3 * joint + 2] == (2 if score >= result["score_threshold"] else 1)  # marked, not zeroed


@pytest.mark.parametrize(("argv", "message"), [
    (["video", "/no/such/clip.mp4", "--out", "t.json"], "no such file"),
    (["video", "{clip}"], "nothing to write"),
    (["video", "{clip}", "--out", "/no/such/folder/t.json"], "does not exist"),
    (["video", "{text}", "--out", "{tmp}/t.json"], "is not a video"),
    (["video", "{clip}", "--out", "{tmp}/t.json", "--checkpoint", "x.pth", "--server", "http://127.0.0.1:9"],
     "--checkpoint is for local runs"),
    (["video", "{clip}", "--out", "{tmp}/t.json", "--model", "coco18"], "--model names a served model"),
    (["video", "{clip}", "--out", "{tmp}/t.json", "--score-threshold", "2"], "score_threshold must be in [0, 1]"),
], ids=["missing", "no-output", "no-folder", "text-file", "checkpoint-remote", "model-local", "bad-threshold"])
def test_bad_input_exits_2_with_a_clear_message(argv: list[str], message: str, short_clip: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n")
    args = [a.format(clip=short_clip, text=text, tmp=tmp_path) for a in argv]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_an_unreachable_server_exits_1(short_clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support import free_port

    code = main(["video", str(short_clip), "--out", str(tmp_path / "t.json"),
                 "--server", f"http://127.0.0.1:{free_port()}"])
    assert code == 1
    assert "unreachable" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- --server
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real ``ditepose serve`` (tiny checkpoint, whole-image detector): (URL, its checkpoint)."""
    folder = tmp_path_factory.mktemp("serve")
    with tiny_server(folder) as url:
        if not has_video_routes(url):
            pytest.skip(VIDEO_ROUTES_MISSING)
        yield url, folder / "tiny.pth"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(python_cmd("video", *args), cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)


def test_server_mode_writes_the_same_tracks_as_a_local_run(server: tuple[str, Path], short_clip: Path,
                                                           tmp_path: Path) -> None:
    url, checkpoint = server
    options = ("--no-flip", "--detect-interval", "3", "--detector", "whole", "--smoothing", "savgol")
    remote = _run(str(short_clip), "--server", url, "--api-key", API_KEY, "--out", str(tmp_path / "r.json"),
                  "--csv", str(tmp_path / "r.csv"), "--coco", str(tmp_path / "r.coco.json"),
                  "--render", str(tmp_path / "r.mp4"), "--poll", "0.1", *options)
    assert remote.returncode == 0, remote.stderr
    assert "accepted" in remote.stderr and f"{FRAMES}/{FRAMES} frames" in remote.stderr
    local = _run(str(short_clip), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "l.json"), *options)
    assert local.returncode == 0, local.stderr
    remote_json, local_json = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("r", "l"))
    assert remote_json["video"] == local_json["video"]
    assert len(remote_json["tracks"]) == len(local_json["tracks"]) == 1  # the whole image: one person
    for r, lt in zip(remote_json["tracks"], local_json["tracks"], strict=True):
        assert (r["track_id"], r["frames"], r["box_source"]) == (lt["track_id"], lt["frames"], lt["box_source"])
        np.testing.assert_allclose(r["boxes"], lt["boxes"], atol=1e-3)
        np.testing.assert_allclose(r["keypoints"], lt["keypoints"], atol=1e-3)
    with (tmp_path / "r.csv").open(newline="") as fh:
        assert sum(1 for _ in csv.DictReader(fh)) == FRAMES * len(remote_json["joints"])
    assert len(json.loads((tmp_path / "r.coco.json").read_text())) == FRAMES
    assert probe(tmp_path / "r.mp4").frames == FRAMES


def test_server_mode_refusals_exit_2_with_the_servers_code(server: tuple[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n")
    refused = _run(str(text), "--server", server[0], "--api-key", API_KEY, "--out", str(tmp_path / "t.json"))
    assert refused.returncode == 2 and "unsupported_media" in refused.stderr, refused.stderr
    no_key = _run(str(text), "--server", server[0], "--out", str(tmp_path / "t.json"))
    assert no_key.returncode == 2 and "unauthorized" in no_key.stderr, no_key.stderr
    assert not (tmp_path / "t.json").exists()


def test_ctrl_c_cancels_the_job_on_the_server(server: tuple[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while waiting (SIGINT to this process once the job has done frames and has frames left) cancels
    the server's job and exits 130. The clip is long (600 frames, seconds of work) so the job is still running
    when the signal lands."""
    long_clip = tmp_path / "long.mp4"
    write_riders_clip(long_clip, riders_camera(frames=600), gop=30)
    url = server[0]
    with DitePoseClient(url, api_key=API_KEY) as api:
        known = {j.id for j in api.jobs(limit=1000)}
        found: list[str] = []

        def interrupt_once_submitted() -> None:
            # Frames done: the 202 is long sent. Frames left (a third of the clip at least): the job is
            # still running when the CLI's cancel arrives, even where a fast machine races through it.
            new = wait_until(lambda: [j.id for j in api.jobs(limit=1000)
                                      if j.id not in known and j.state == "running"
                                      and 0 < (j.frames_done or 0) < (j.frames_total or 0) * 2 // 3],
                             timeout=120, what="the CLI's job to be running with frames done and left",
                             interval=0.05)
            found.extend(new)
            os.kill(os.getpid(), signal.SIGINT)

        # A shell that starts a command in the background (`nohup make test &`, as CI runners do) leaves
        # SIGINT ignored and Python keeps it so: a real Ctrl-C comes from a terminal, where Python's handler
        # raises KeyboardInterrupt. Install that handler here, whoever started the test run.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        watcher = threading.Thread(target=interrupt_once_submitted, daemon=True)
        watcher.start()
        try:
            code = main(["video", str(long_clip), "--server", url, "--api-key", API_KEY, "--out",
                         str(tmp_path / "t.json"), "--poll", "0.2"])
        finally:
            signal.signal(signal.SIGINT, previous)
        watcher.join(30)
        assert code == 130
        assert f"job {found[0]} cancelled" in capsys.readouterr().err
        assert api.wait(found[0], poll_s=0.1, timeout=120).state == "cancelled"
    assert not (tmp_path / "t.json").exists()


def test_the_progress_bar_writes_a_line_per_tenth_in_a_log() -> None:
    pipe = io.StringIO()  # not a terminal, like a CI log
    bar = ProgressBar(pipe, width=10)
    bar.update(None, None, "queued")
    for done in range(1, 101):
        bar.update(done, 100, "running")
    bar.close()
    lines = pipe.getvalue().splitlines()
    assert lines[0].endswith("queued") and lines[1].endswith("1/100 frames running")  # a new state: a line
    assert lines[-1] == "[##########] 100.0% 100/100 frames running"
    assert len(lines) == 2 + 10  # queued, running, then 10 %, 20 %, ... 100 %
