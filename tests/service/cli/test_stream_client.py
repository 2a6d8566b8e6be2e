"""``ditepose serve`` starts gRPC next to REST; ``ditepose stream`` writes JSON lines and a video.

Both commands run as real subprocesses (``python -m ditepose``) against a tiny checkpoint.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import REPO_ROOT, python_cmd, stop_process, subprocess_env
from tests.service.grpc.support import figure_frame, tiny_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")
    rest, rpc = _free_port(), _free_port()
    proc = subprocess.Popen(
        python_cmd("serve", "--port", str(rest), "--grpc-port", str(rpc), "--devices", "cpu", "--model", f"tiny={ckpt}"),
        cwd=REPO_ROOT,
        env=subprocess_env(DITEPOSE_MAX_DELAY_MS="2", DITEPOSE_DETECTOR="whole"),  # one box per frame
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        with grpc.insecure_channel(f"127.0.0.1:{rpc}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while True:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "gRPC did not come up"
                time.sleep(0.2)
        yield rest, rpc
    finally:
        stop_process(proc)


def _video(path: Path, frames: int = 12) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (320, 240))
    for i in range(frames):
        img, _ = figure_frame(i)
        writer.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_serve_runs_rest_and_grpc_on_one_process(served: tuple[int, int]) -> None:
    rest, _rpc = served
    assert httpx.get(f"http://127.0.0.1:{rest}/healthz", timeout=10).status_code == 200


def test_stream_video_to_jsonl_and_annotated_video(served: tuple[int, int], tmp_path: Path) -> None:
    video = _video(tmp_path / "walk.mp4")
    out, lines = tmp_path / "annotated.mp4", tmp_path / "out.jsonl"
    proc = subprocess.run(
        python_cmd("stream", str(video), "--target", f"127.0.0.1:{served[1]}", "--out", str(out),
                   "--jsonl", str(lines), "--no-flip", "--max-in-flight", "3"),
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "12 frames sent, 12 answered" in proc.stdout
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [r["sequence_number"] for r in records] == list(range(12))
    assert records[3]["timestamp"] == pytest.approx(0.3)
    # No boxes: the 'whole' detector makes the frame one person; the tracker keeps its id.
    assert all(len(r["persons"]) == 1 and r["persons"][0]["track_id"] == 1 for r in records)
    capture = cv2.VideoCapture(str(out))
    count = 0
    while capture.read()[0]:
        count += 1
    assert count == 12


def test_stream_image_folder_and_bad_target(served: tuple[int, int], tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        img, _ = figure_frame(i)
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    lines = tmp_path / "out.jsonl"
    proc = subprocess.run(
        python_cmd("stream", str(folder), "--target", f"127.0.0.1:{served[1]}", "--jsonl", str(lines),
                   "--policy", "drop-oldest", "--model", "tiny"),
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    answered = [r["sequence_number"] for r in records]
    dropped = [s for r in records for s in r["dropped_before"]]
    assert sorted(answered + dropped) == [0, 1, 2, 3]
    bad = subprocess.run(
        python_cmd("stream", str(folder), "--target", f"127.0.0.1:{served[1]}", "--model", "nope"),
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
    # gRPC metrics appear on the REST app's /metrics page.
    metrics = httpx.get(f"http://127.0.0.1:{served[0]}/metrics", timeout=10).text
    assert 'ditepose_grpc_calls_total{code="NOT_FOUND",method="StreamPose"} 1.0' in metrics
    assert 'ditepose_grpc_stream_frames_total{outcome="answered"}' in metrics
    assert "ditepose_grpc_active_streams 0.0" in metrics


def test_sender_and_receiver_without_a_server(tmp_path: Path) -> None:
    """Dropped frames are counted and written bare (the video keeps its length); every slot is freed."""
    import numpy as np

    from ditepose.proto.ditepose.v1 import pose_pb2
    from ditepose.service.cli.stream_client import (
        SourceFrame,
        StreamSummary,
        _InFlight,
        _receive,
        _requests,
        _ResultWriter,
        stream_config,
    )

    image = np.zeros((48, 64, 3), np.uint8)
    frames = [SourceFrame(i, i / 10, b"jpeg", image) for i in range(4)]
    in_flight, summary = _InFlight(window=4), StreamSummary()
    sent = list(_requests(stream_config(policy="drop-oldest"), iter(frames), in_flight, summary,
                          pace=False, started=time.perf_counter()))
    assert sent[0].HasField("config") and [r.frame.sequence_number for r in sent[1:]] == [0, 1, 2, 3]
    assert summary.frames_sent == 4
    in_flight.close()
    assert not in_flight.reserve()  # the window is full: a closed stream stops waiting for a slot
    results = [pose_pb2.StreamResult(sequence_number=0, width=64, height=48),
               pose_pb2.StreamResult(sequence_number=3, dropped_sequence_numbers=[1, 2],
                                     error=pose_pb2.FrameError(code="inference_failed", message="x"))]
    writer = _ResultWriter(tmp_path / "out.jsonl", tmp_path / "out.mp4", 10.0, tmp_path)
    try:
        _receive(iter(results), in_flight, writer, summary)
    finally:
        writer.close()
    assert (summary.results, summary.dropped, summary.errors, len(summary.latencies_ms)) == (2, 2, 1, 2)
    assert all(in_flight.reserve() for _ in range(4))  # all four slots came back
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["sequence_number"] for r in records] == [0, 3] and records[1]["dropped_before"] == [1, 2]
    capture = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    count = 0
    while capture.read()[0]:
        count += 1
    assert count == 4
    with pytest.raises(ValueError, match="policy"):
        stream_config(policy="lifo")
