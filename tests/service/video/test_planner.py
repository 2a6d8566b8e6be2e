"""The per-frame box plan of a video (:mod:`ditepose.service.video.planner`), without a transport.

The gRPC stream tests (tests/service/grpc/test_stream_detection.py) check the same rules end to
end on a real server; these pin them down frame by frame, including the orders of completion a
real server only produces by chance.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ditepose.service.video.planner import BoxSource, FramePlan, FramePlanner

D, C, U = BoxSource.DETECTED, BoxSource.CARRIED, BoxSource.CLIENT


def _person_at(x0: float) -> tuple[np.ndarray, np.ndarray]:
    """17 confident keypoints over a 40 x 100 px figure at (x0, 50), and the box they were found in."""
    xs = x0 + np.tile([0.0, 20.0, 40.0], 6)[:17]
    ys = 50.0 + np.repeat(np.linspace(0.0, 100.0, 6), 3)[:17]
    return np.stack([xs, ys, np.full(17, 0.9)], axis=1), np.array([x0 - 5.0, 37.5, 50.0, 125.0])


def _finish(planner: FramePlanner, frame: FramePlan, x0: float | None) -> None:
    """Frame ``frame`` finished: with one person at ``x0``, or failed (None)."""
    if x0 is not None:
        kpts, box = _person_at(x0)
        planner.remember(frame, [kpts], [box], 640, 480)
    frame.finish()


def test_the_detector_runs_every_nth_frame_and_caller_boxes_win() -> None:
    planner = FramePlanner(detect_interval=3, max_in_flight=1)
    sources = [planner.plan(has_boxes=i == 4).source for i in range(8)]
    assert sources == [D, C, C, D, U, C, D, C]
    assert [f.source for f in (FramePlanner(1, 4).plan(False) for _ in range(3))] == [D, D, D]


def test_a_carried_frame_waits_for_its_anchor_and_takes_the_latest_finished_boxes() -> None:
    async def scenario() -> tuple[list[list[float]] | None, list[list[float]] | None]:
        planner = FramePlanner(detect_interval=10, max_in_flight=4)
        anchor, second, third = planner.plan(False), planner.plan(False), planner.plan(False)
        assert (anchor.source, second.source, third.source) == (D, C, C)
        assert second.anchor is anchor and third.anchor is anchor
        waiting = asyncio.ensure_future(planner.carried(second))
        await asyncio.sleep(0)
        assert not waiting.done()  # the anchor has not finished yet
        _finish(planner, anchor, 100.0)
        from_anchor = await waiting
        _finish(planner, second, 110.0)
        return from_anchor, await planner.carried(third)

    from_anchor, from_second = asyncio.run(scenario())
    assert from_anchor is not None and from_second is not None
    assert from_anchor[0][0] == pytest.approx(95.0)  # the anchor's person
    assert from_second[0][0] == pytest.approx(105.0)  # the later carried frame's, finished meanwhile


def test_a_failed_anchor_makes_the_carried_frame_detect() -> None:
    async def scenario() -> list[list[float]] | None:
        planner = FramePlanner(detect_interval=5, max_in_flight=2)
        anchor, carried = planner.plan(False), planner.plan(False)
        _finish(planner, anchor, None)
        return await planner.carried(carried)

    assert asyncio.run(scenario()) is None
    frame = FramePlan(1, C)
    frame.detect_instead()
    assert frame.source is D


def test_only_a_carried_frame_has_an_anchor_and_old_boxes_are_forgotten() -> None:
    planner = FramePlanner(detect_interval=2, max_in_flight=1)
    frames = [planner.plan(False) for _ in range(12)]
    with pytest.raises(ValueError, match="not carried"):
        asyncio.run(planner.carried(frames[0]))
    for frame in frames:
        _finish(planner, frame, 100.0)
    assert planner.remembered == planner.detect_interval + planner.max_in_flight + 1
    with pytest.raises(ValueError, match="detect_interval"):
        FramePlanner(0, 1)
