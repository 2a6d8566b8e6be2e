"""A long stream (10,000 small frames, tiny 64x64 model, tracking + smoothing on) leaks nothing.

Resident memory is sampled from /proc after warm-up and at the end, each time after ``gc`` and
``malloc_trim`` (a loaded CI run once saw 43 MB of allocator slack that an idle run returns); the server's asyncio task
count is sampled mid-stream (bounded by the in-flight window) and after the call (baseline).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from ditepose.proto.ditepose.v1 import pose_pb2
from tests.service.grpc.support import config_message, figure_frame, frame_message, stub, tiny_services
from tests.support import settled_rss_bytes

FRAMES = int(os.environ.get("DITEPOSE_LONG_STREAM_FRAMES", "10000"))


def _rss_mb() -> float:
    """Resident memory once freed heap is returned (a leak stays; allocator slack does not)."""
    return settled_rss_bytes() / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_ten_thousand_frames_leak_no_memory_or_tasks(tmp_path: Path) -> None:
    # A handful of distinct small frames, cycled (encoding is not what is under test).
    cycle = []
    for i in range(8):
        img, box = figure_frame(i, width=96, height=72, x0=10, speed=2)
        small_box = [box[0] * 0.3, 2.0, box[2] * 0.3, 68.0]
        cycle.append(frame_message(0, img[:72, :96].copy(), [small_box]))
    with tiny_services(tmp_path, max_batch_size=64) as (_pool, _app, server, ch):
        baseline = server.tasks()
        samples: dict[str, float] = {}
        mid_tasks = []

        def requests():
            yield config_message(
                options=pose_pb2.PoseOptions(flip_test=False),
                max_in_flight=64,
                tracking=pose_pb2.TrackingConfig(enabled=True),
                smoothing=pose_pb2.SmoothingConfig(enabled=True),
            )
            for i in range(FRAMES):
                msg = pose_pb2.StreamRequest()
                msg.CopyFrom(cycle[i % len(cycle)])
                msg.frame.sequence_number = i
                msg.frame.timestamp = i / 30.0
                yield msg

        expected = 0
        started = time.perf_counter()
        for result in stub(ch).StreamPose(requests(), timeout=900):
            assert result.sequence_number == expected and not result.HasField("error")
            expected += 1
            if expected == FRAMES // 5:
                samples["warm"] = _rss_mb()
            if expected == FRAMES // 2:
                mid_tasks.append(server.tasks())
        elapsed = time.perf_counter() - started
        samples["end"] = _rss_mb()
        assert expected == FRAMES
        deadline = time.monotonic() + 10
        while server.tasks() > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        after = server.tasks()
    growth = samples["end"] - samples["warm"]
    print(f"\n{FRAMES} frames in {elapsed:.1f} s ({FRAMES / elapsed:.0f} fps); RSS {samples['warm']:.0f} -> "
          f"{samples['end']:.0f} MB; tasks baseline {baseline}, mid {mid_tasks}, after {after}")
    assert after <= baseline
    # Reader + dispatcher + the call, and one task per frame in flight (<= 64).
    assert mid_tasks and mid_tasks[0] <= baseline + 2 + 64 + 2
    assert growth < 25.0, f"resident memory grew {growth:.1f} MB over {FRAMES * 4 // 5} frames"
    assert np.isfinite(growth)
