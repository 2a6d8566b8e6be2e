"""One ``StreamPose`` call: bounded in-flight frames, overflow policy, in-order results, tracking.

Three pieces share a small amount of state on the server's event loop:

* the reader takes frames from the client into a waiting buffer (``max_queued`` long).
  Under ``QUEUE`` it stops reading while the buffer is full, so HTTP/2 flow control slows
  the sender; under ``DROP_OLDEST`` it keeps reading and drops the oldest waiting frame;
* the dispatcher moves the oldest waiting frame into processing when one of the
  ``max_in_flight`` slots is free (frames of many streams meet in the shared batcher);
* the emitter (the response generator) awaits the frames in the order they were taken,
  runs tracking/smoothing, and frees the slot once the result is handed to gRPC.

Person detection every N frames (``StreamConfig.detect_interval``, as rtmlib's
``det_frequency``): the dispatcher plans each frame's boxes with a
:class:`~ditepose.service.video.planner.FramePlanner` (the caller's, the detector's, or carried
from an earlier frame; the rules and why they are so are in that module) and this transport maps
its :class:`~ditepose.service.video.planner.BoxSource` to ``pose_pb2.BOX_SOURCE_*``.

A carried person's ``score`` is its keypoints' mean alone, as with caller boxes: there is no
detector score to weigh it by, so the same person scores differently on detected and carried
frames (mind that with ``score_threshold``).

Cancelling the call cancels all three and every frame in flight; nothing outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ditepose.proto.ditepose.v1 import pose_pb2
from ditepose.service.core.errors import ServiceError
from ditepose.service.core.pose_service import PoseRequest, PoseResult
from ditepose.service.grpc.convert import person_to_proto, request_from_proto, timings_to_proto
from ditepose.service.video.carry import CarryConfig
from ditepose.service.video.planner import BoxSource, FramePlan, FramePlanner
from ditepose.service.video.smoothing import KeypointSmoother, OneEuroConfig
from ditepose.service.video.tracking import PoseTracker, TrackerConfig

DEFAULT_MAX_IN_FLIGHT = 4
MAX_IN_FLIGHT_LIMIT = 64
MAX_QUEUED_LIMIT = 64
# bench/stream_detect.py on a 2-core CPU VM, HRNet-18 256x192 + NanoDet: every 5th frame streams at
# 104 ms/frame against 126 detecting every frame (4 people; caller boxes: 78), 1011 against 1181
# (28 boxes; 561). Every 10th measured no faster than every 5th (145 vs 144 ms, 4 people), and 5
# leaves a person entering the picture unseen for at most 1/6 s at 30 frames/s.
DEFAULT_DETECT_INTERVAL = 5
MAX_DETECT_INTERVAL = 300  # 10 s at 30 frames/s: longer and people entering the picture go unseen too long

RunFrame = Callable[[PoseRequest], Awaitable[PoseResult]]

BOX_SOURCE_TO_PROTO: dict[BoxSource, pose_pb2.BoxSource] = {
    BoxSource.CLIENT: pose_pb2.BOX_SOURCE_CLIENT,
    BoxSource.DETECTED: pose_pb2.BOX_SOURCE_DETECTED,
    BoxSource.CARRIED: pose_pb2.BOX_SOURCE_CARRIED,
}


@dataclass(frozen=True)
class StreamOptions:
    """The validated ``StreamConfig`` of one call."""

    options: pose_pb2.PoseOptions
    drop_oldest: bool = False
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_queued: int = 1
    tracking: TrackerConfig | None = None
    smoothing: OneEuroConfig | None = None
    detect_interval: int = DEFAULT_DETECT_INTERVAL
    carry: CarryConfig = field(default_factory=CarryConfig)

    @classmethod
    def from_proto(cls, config: pose_pb2.StreamConfig) -> StreamOptions:
        if config.policy not in (pose_pb2.OVERFLOW_POLICY_QUEUE, pose_pb2.OVERFLOW_POLICY_DROP_OLDEST):
            raise ServiceError("invalid_request", f"unknown overflow policy {config.policy}")
        in_flight = config.max_in_flight or DEFAULT_MAX_IN_FLIGHT
        queued = config.max_queued or 1
        if in_flight > MAX_IN_FLIGHT_LIMIT or queued > MAX_QUEUED_LIMIT:
            raise ServiceError(
                "invalid_request",
                f"max_in_flight must be <= {MAX_IN_FLIGHT_LIMIT} and max_queued <= {MAX_QUEUED_LIMIT}",
            )
        interval = config.detect_interval or DEFAULT_DETECT_INTERVAL
        if interval > MAX_DETECT_INTERVAL:
            raise ServiceError(
                "invalid_request",
                f"detect_interval must be <= {MAX_DETECT_INTERVAL} frames (1 = detect on every frame, "
                f"0 = the server's default {DEFAULT_DETECT_INTERVAL}), got {config.detect_interval}",
            )
        tracking = smoothing = None
        try:
            if config.tracking.enabled or config.smoothing.enabled:
                t = config.tracking
                tracking = TrackerConfig(min_similarity=t.min_similarity or 0.3, max_age=t.max_age or 30)
            if config.smoothing.enabled:
                s = config.smoothing
                smoothing = OneEuroConfig(
                    min_cutoff=s.min_cutoff or 1.0, beta=s.beta if s.beta else 0.05, d_cutoff=s.d_cutoff or 1.0
                )
        except ValueError as exc:
            raise ServiceError("invalid_request", str(exc)) from exc
        return cls(
            options=config.options,
            drop_oldest=config.policy == pose_pb2.OVERFLOW_POLICY_DROP_OLDEST,
            max_in_flight=in_flight,
            max_queued=queued,
            tracking=tracking,
            smoothing=smoothing,
            detect_interval=interval,
        )


def _retrieve(future: asyncio.Future) -> None:
    """Mark a future's outcome as seen (a cancelled shutdown must not log 'never retrieved')."""
    if not future.cancelled():
        future.exception()


@dataclass(eq=False)
class _Job:
    frame: pose_pb2.Frame
    dropped: list[int] = field(default_factory=list)
    plan: FramePlan | None = None  # set when the frame is dispatched

    @property
    def box_source(self) -> pose_pb2.BoxSource:
        return pose_pb2.BOX_SOURCE_UNSPECIFIED if self.plan is None else BOX_SOURCE_TO_PROTO[self.plan.source]


@dataclass
class _Outcome:
    job: _Job
    result: PoseResult | None
    error: ServiceError | None


class StreamSession:
    """Runs one stream; iterate :meth:`results` with the call's request iterator."""

    def __init__(self, opts: StreamOptions, run_frame: RunFrame, sigmas: Sequence[float] | None = None) -> None:
        self.opts = opts
        self.run_frame = run_frame
        self.tracker = PoseTracker(opts.tracking, sigmas) if opts.tracking is not None else None
        self.smoother = KeypointSmoother(opts.smoothing) if opts.smoothing is not None else None
        self._waiting: deque[_Job] = deque()
        self._dropped: list[int] = []
        self._wake = asyncio.Event()  # something arrived in _waiting, or the input ended
        self._space = asyncio.Event()  # _waiting has room again (QUEUE)
        self._slots = asyncio.Semaphore(opts.max_in_flight)
        self._out: asyncio.Queue[asyncio.Task[_Outcome] | None] = asyncio.Queue()
        self._input_done = False
        self._input_error: BaseException | None = None
        self._tasks: set[asyncio.Task] = set()
        self._planner = FramePlanner(opts.detect_interval, opts.max_in_flight, opts.carry)
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0
        self.frames_failed = 0

    # ------------------------------------------------------------------ reader
    async def _read(self, frames: AsyncIterator[pose_pb2.StreamRequest]) -> None:
        try:
            async for message in frames:
                if message.WhichOneof("kind") != "frame":
                    raise ServiceError("invalid_request", "only the first message of a stream may be a config")
                self.frames_in += 1
                job = _Job(message.frame)
                if self.opts.drop_oldest:
                    if len(self._waiting) >= self.opts.max_queued:
                        self._dropped.append(self._waiting.popleft().frame.sequence_number)
                        self.frames_dropped += 1
                else:
                    while len(self._waiting) >= self.opts.max_queued:
                        self._space.clear()
                        await self._space.wait()
                self._waiting.append(job)
                self._wake.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._input_error = exc
        finally:
            self._input_done = True
            self._wake.set()

    # -------------------------------------------------------------- dispatcher
    async def _dispatch(self) -> None:
        while True:
            while not self._waiting:
                if self._input_done:
                    await self._out.put(None)
                    return
                self._wake.clear()
                await self._wake.wait()
            await self._slots.acquire()
            if not self._waiting:  # cannot happen today (only we pop), but keep the slot honest
                self._slots.release()
                continue
            job = self._waiting.popleft()  # the oldest frame still waiting (drops happen meanwhile)
            job.dropped, self._dropped = self._dropped, []
            job.plan = self._planner.plan(has_boxes=len(job.frame.boxes) > 0)
            self._space.set()
            task = asyncio.create_task(self._process(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            await self._out.put(task)

    async def _process(self, job: _Job) -> _Outcome:
        frame, plan = job.frame, job.plan
        assert plan is not None  # planned by the dispatcher before the task starts
        try:
            request = request_from_proto(frame.image, frame.boxes, self.opts.options)
            carried = await self._planner.carried(plan) if plan.source is BoxSource.CARRIED else None
            if plan.source is BoxSource.CARRIED and carried is None:
                plan.detect_instead()
            try:
                result = await self.run_frame(request if carried is None else replace(request, boxes=carried))
            except ServiceError as exc:
                if carried is None or exc.code != "bad_boxes":
                    raise
                plan.detect_instead()  # boxes of a larger frame: find the people again
                result = await self.run_frame(request)
            poses = result.poses
            self._planner.remember(plan, [p.keypoints for p in poses], [p.bbox_xywh for p in poses],
                                   result.width, result.height)
            return _Outcome(job, result, None)
        except ServiceError as exc:
            return _Outcome(job, None, exc)
        finally:
            plan.finish()

    # ----------------------------------------------------------------- emitter
    async def results(self, frames: AsyncIterator[pose_pb2.StreamRequest]) -> AsyncIterator[pose_pb2.StreamResult]:
        reader = asyncio.create_task(self._read(frames))
        dispatcher = asyncio.create_task(self._dispatch())
        try:
            while True:
                task = await self._out.get()
                if task is None:
                    break
                outcome = await task
                message = self._to_message(outcome)
                self.frames_out += 1
                yield message
                self._slots.release()
            await reader
            if self._input_error is not None:
                raise self._input_error
        finally:
            await self._shutdown(reader, dispatcher)

    async def _shutdown(self, *workers: asyncio.Task) -> None:
        pending = [*workers, *self._tasks]
        while not self._out.empty():
            item = self._out.get_nowait()
            if item is not None:
                pending.append(item)
        for task in pending:
            task.cancel()
        gathered = asyncio.gather(*pending, return_exceptions=True)
        gathered.add_done_callback(_retrieve)
        with contextlib.suppress(BaseException):
            await gathered
        self._waiting.clear()
        self._tasks.clear()

    # ---------------------------------------------------------------- tracking
    def _to_message(self, outcome: _Outcome) -> pose_pb2.StreamResult:
        frame = outcome.job.frame
        message = pose_pb2.StreamResult(
            sequence_number=frame.sequence_number,
            timestamp=frame.timestamp,
            dropped_sequence_numbers=outcome.job.dropped,
            box_source=outcome.job.box_source,
        )
        if outcome.error is not None or outcome.result is None:
            err = outcome.error or ServiceError("internal", "no result")
            message.error.code, message.error.message = err.code, err.message
            self.frames_failed += 1
            return message
        result = outcome.result
        message.model, message.width, message.height = result.model, result.width, result.height
        message.model_version = result.model_version
        message.timings.CopyFrom(timings_to_proto(result.timings))
        ids = [0] * len(result.poses)
        smoothed: list[np.ndarray | None] = [None] * len(result.poses)
        if self.tracker is not None:
            boxes = np.array([p.bbox_xywh for p in result.poses], np.float64).reshape(-1, 4)
            kpts = np.stack([p.keypoints for p in result.poses]) if result.poses else None
            ids = self.tracker.update(boxes, kpts)
            if self.smoother is not None:
                for i, pose in enumerate(result.poses):
                    smoothed[i] = self.smoother.smooth(ids[i], pose.keypoints, frame.timestamp)
                self.smoother.retain(self.tracker.live_ids)
        message.persons.extend(
            person_to_proto(p, result.spec, ids[i], None if (xy := smoothed[i]) is None else xy[:, :2])
            for i, p in enumerate(result.poses)
        )
        return message
