"""The benchmark's raw HTTP/1.1 client against the real server: answers validated, errors counted."""

from __future__ import annotations

import asyncio
import os

from bench.loadgen import pose_request, run_level
from tests.service.conftest import encode, figure_image


def test_prebuilt_request_is_served_and_every_answer_checked(server):
    jpeg = encode(figure_image(seed=3))
    request = pose_request("127.0.0.1", server.port, jpeg, [[230.0, 50.0, 180.0, 390.0]], flip=False)
    result = asyncio.run(run_level("127.0.0.1", server.port, request, concurrency=3, requests=7))
    assert result.errors == {} and len(result.latencies_s) == 7
    assert result.wall_s > 0
    # CPU seconds of this process (here the live server's thread too) while the level ran: some,
    # and no more than its cores allow in that wall time (not a cumulative or mis-scaled reading)
    assert 0 < result.client_cpu_s <= result.wall_s * len(os.sched_getaffinity(0)) + 0.01
    assert result.stage_sums_ms["total_ms"] >= result.stage_sums_ms["inference_ms"] > 0


def test_error_answers_and_wrong_shapes_are_counted_not_timed(server):
    jpeg = encode(figure_image(seed=4))
    outside = pose_request("127.0.0.1", server.port, jpeg, [[5000.0, 5000.0, 10.0, 10.0]], flip=False)
    result = asyncio.run(run_level("127.0.0.1", server.port, outside, concurrency=2, requests=3))
    assert result.errors == {"bad_boxes": 3} and result.latencies_s == []
    two = pose_request("127.0.0.1", server.port, jpeg, [[230.0, 50.0, 180.0, 390.0]] * 2, flip=False)
    result = asyncio.run(run_level("127.0.0.1", server.port, two, concurrency=1, requests=2, persons=1))
    assert result.errors == {"ProtocolError": 2} and result.latencies_s == []
