"""Where each video frame's person boxes come from: the caller, the detector, or an earlier frame.

A stream runs the person detector every N frames (rtmlib's ``det_frequency``) and carries boxes
from an earlier frame's poses on the frames between (:mod:`ditepose.service.video.carry`). These
rules know no transport: the gRPC stream (:mod:`ditepose.service.grpc.stream`) maps
:class:`BoxSource` to its ``BOX_SOURCE_*`` at its edge, and an offline video job can use the
same :class:`FramePlanner`.

Frames are numbered in dispatch order (dropped frames never get a number) and planned:

* a frame that brings its own boxes uses them (``CLIENT``);
* frames 0, N, 2N, ... run the detector (``DETECTED``), as does the first frame;
* the frames between carry boxes (``CARRIED``). With several frames in flight a carried frame is
  dispatched before the frame just before it has finished, so it cannot always wait for that one.
  It waits for its *anchor*, the latest frame planned before it that detected or brought its own
  boxes (already in flight, so the wait holds no one else up), then takes the boxes of the
  highest-numbered frame before it that has finished by then: the anchor itself or a later
  carried frame. With one frame in flight that is always the previous frame (rtmlib exactly).
* when those boxes are empty (nobody found, or the source frame failed), the frame runs the
  detector instead (:meth:`FramePlan.detect_instead`); so does a carried frame whose boxes the
  service refuses (a smaller frame than the one they came from).

So which frames run the detector depends only on the stream and its results, not on timing, as
long as no carried frame comes back with nobody in it. Why wait for the anchor rather than take
whatever frame had finished (possibly one from before the last detection): on a 2-core CPU VM
the second way streamed no faster (bench/stream_detect.py) and split more tracks (10 track ids
instead of 5 over 40 frames of 4 people), as the frames just after a detection went on with the
boxes from before it.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ditepose.service.video.carry import CarryConfig, carried_boxes


class BoxSource(enum.Enum):
    """Where a frame's person boxes came from."""

    CLIENT = "client"
    DETECTED = "detected"
    CARRIED = "carried"


@dataclass(eq=False)
class FramePlan:
    """One frame's number, box source and (for a carried frame) the anchor it waits for."""

    index: int
    source: BoxSource
    anchor: FramePlan | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)  # set once this frame's result is known

    def detect_instead(self) -> None:
        """The carried boxes could not be used: this frame ran the detector."""
        self.source = BoxSource.DETECTED

    def finish(self) -> None:
        """This frame's result (or failure) is known: frames anchored on it may go on."""
        self.done.set()


class FramePlanner:
    """Plans the frames of one video in dispatch order and keeps the boxes later frames may carry.

    Single-threaded: use it from one event loop (each stream has its own)."""

    def __init__(self, detect_interval: int, max_in_flight: int, carry: CarryConfig | None = None) -> None:
        if detect_interval < 1 or max_in_flight < 1:
            raise ValueError(f"detect_interval and max_in_flight must be >= 1, got {detect_interval}, {max_in_flight}")
        self.detect_interval = detect_interval
        self.max_in_flight = max_in_flight
        self.carry = carry or CarryConfig()
        self._planned = 0
        self._anchor: FramePlan | None = None
        self._boxes: dict[int, np.ndarray] = {}  # number of a finished frame -> boxes for later frames

    @property
    def remembered(self) -> int:
        """How many finished frames' boxes are kept (bounded: a long video must not grow it)."""
        return len(self._boxes)

    def plan(self, has_boxes: bool) -> FramePlan:
        """Number the next frame and decide where its boxes come from (module docstring)."""
        index, self._planned = self._planned, self._planned + 1
        if has_boxes:
            planned = FramePlan(index, BoxSource.CLIENT)
        elif self._anchor is None or index % self.detect_interval == 0:
            planned = FramePlan(index, BoxSource.DETECTED)
        else:
            return FramePlan(index, BoxSource.CARRIED, anchor=self._anchor)
        self._anchor = planned
        return planned

    async def carried(self, frame: FramePlan) -> list[list[float]] | None:
        """The boxes a CARRIED frame gets, once its anchor has finished; None: detect instead."""
        anchor, frame.anchor = frame.anchor, None  # do not keep the anchor alive any longer
        if anchor is None:
            raise ValueError(f"frame {frame.index} is {frame.source.value}, not carried: it has no anchor")
        await anchor.done.wait()
        sources = [i for i in self._boxes if anchor.index <= i < frame.index]
        if not sources:  # the anchor failed, or no frame since has finished
            return None
        boxes = self._boxes[max(sources)]
        return boxes.tolist() if len(boxes) else None

    def remember(
        self, frame: FramePlan, keypoints: Sequence[np.ndarray], boxes: Sequence[np.ndarray], width: int, height: int
    ) -> None:
        """Keep the boxes later frames may carry from this finished frame's poses."""
        if self.detect_interval == 1:
            return
        self._boxes[frame.index] = carried_boxes(keypoints, boxes, width, height, self.carry)
        # A frame planned later can only take boxes of frames at most interval + in-flight before it.
        oldest = max(self._boxes) - self.detect_interval - self.max_in_flight
        for index in [i for i in self._boxes if i < oldest]:
            del self._boxes[index]
