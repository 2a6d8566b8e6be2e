"""Video in, tracks out, without a server: decode -> detect every N frames -> carry boxes -> pose -> track.

The pieces are the live stream's (:mod:`.carry`, :mod:`.tracking`, :mod:`.smoothing`) and the
model package's (a person detector, a :class:`~ditepose.model.pipeline.TopDownPipeline` around
an ``infer(crops) -> heatmaps`` callable). What is offline about it:

* the detection schedule is fixed by the frame's *absolute* index: the detector runs on frames
  0, N, 2N, ..., on the first frame a segment runs, and on any frame whose carried boxes came
  out empty (nobody left to carry); every other frame takes the boxes carried from the frame
  before (:func:`~ditepose.service.video.carry.carried_boxes`). That makes a segment's results
  from its first detection on equal to a single run's (:mod:`.stitch`);
* a segment [start, end) runs alone (:meth:`SegmentRunner.run`): a Celery task, a thread of an
  embedded job, or the CLI's loop over all segments (:func:`run_video`);
* smoothing runs after stitching, over each whole track (:func:`finish_result`): the two-sided
  Savitzky–Golay filter, or the causal One Euro filter for parity with the stream.

The service passes its own ``infer`` (its pool's batcher as background work) and detector; the
CLI and the bench build both here (:func:`load_video_model`, the engine ``make_infer`` builds:
this package may not import the batching layer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from ditepose.model.detectors import PersonDetector
from ditepose.model.keypoints import KeypointSpec
from ditepose.model.pipeline import TopDownPipeline, infer_in_batches
from ditepose.service.video.carry import CarryConfig, carried_boxes
from ditepose.service.video.decode import FrameIndex, VideoInfo, decode_frames, probe, read_index
from ditepose.service.video.results import TrackSeries, VideoMeta, VideoResult
from ditepose.service.video.smoothing import OneEuroConfig, SavgolConfig, one_euro_keypoints, savgol_keypoints
from ditepose.service.video.stitch import SegmentPlan, SegmentResult, plan_segments, stitch_segments
from ditepose.service.video.tracking import PoseTracker, TrackerConfig

InferFn = Callable[[torch.Tensor], torch.Tensor]
Smoothing = Literal["none", "one_euro", "savgol"]
SMOOTHING_METHODS: tuple[str, ...] = ("none", "one_euro", "savgol")
DEFAULT_DETECT_INTERVAL = 5  # the stream's default (service/grpc/stream.py measured it)


class VideoCancelled(RuntimeError):
    """The job's ``should_stop`` said stop; the segment's partial work is dropped."""


@dataclass(frozen=True)
class PoseModel:
    """A pose network ready to run: its ``infer`` callable and what the pipeline needs to know."""

    name: str
    version: str
    infer: InferFn
    input_size: tuple[int, int]  # (W, H)
    spec: KeypointSpec


class ResultModel(Protocol):
    """What a result says of its model: a :class:`PoseModel`, or the merge's record of one (no weights)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def spec(self) -> KeypointSpec: ...


@dataclass(frozen=True)
class VideoOptions:
    """A video job's options (the issue's ``detect_interval``, ``flip_test``, ``score_threshold``,
    ``smoothing``, ``max_persons``) and the tracker, carry and smoothing settings behind them."""

    detect_interval: int = DEFAULT_DETECT_INTERVAL
    flip_test: bool = True
    score_threshold: float = 0.3  # keypoints below it are marked not visible (results.py)
    smoothing: Smoothing = "none"
    max_persons: int = 20
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    carry: CarryConfig = field(default_factory=CarryConfig)
    one_euro: OneEuroConfig = field(default_factory=OneEuroConfig)
    savgol: SavgolConfig = field(default_factory=SavgolConfig)
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.detect_interval < 1:
            raise ValueError(f"detect_interval must be >= 1, got {self.detect_interval}")
        if self.smoothing not in SMOOTHING_METHODS:
            raise ValueError(f"smoothing must be one of {SMOOTHING_METHODS}, got {self.smoothing!r}")
        if self.max_persons < 1 or self.batch_size < 1:
            raise ValueError("max_persons and batch_size must be >= 1")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")


def load_video_model(checkpoint: str | Path, device: str = "cpu", precision: str = "auto",
                     name: str | None = None, engine: str = "auto") -> PoseModel:
    """A checkpoint behind the engine the service would serve it on (the one resolver,
    :func:`~ditepose.model.engines.select.build_chosen_engine`: with ``engine="auto"`` OpenVINO on a CPU
    where it is installed and agrees with the torch engine, else the torch engine; ``precision="auto"``:
    fp16 on CUDA, fp32 on the CPU); version: the file's sha256, first 12 digits."""
    from ditepose.model.checkpoint import load_pose_model
    from ditepose.model.engines.select import build_chosen_engine
    from ditepose.model.keypoints import spec_for_checkpoint
    from ditepose.model.repository import file_sha256

    module, meta = load_pose_model(checkpoint, map_location="cpu")
    spec = spec_for_checkpoint(meta.dataset, meta.num_joints)
    width, height = meta.input_size
    served, _ = build_chosen_engine(module, device, precision, engine, (height, width))
    version = "sha256:" + file_sha256(checkpoint)[:12]
    return PoseModel(name or Path(checkpoint).stem, version, served, meta.input_size, spec)


@dataclass
class _TrackBuilder:
    """Rows of one segment-local track as frames come in."""

    track_id: int
    frames: list[int] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    keypoints: list[np.ndarray] = field(default_factory=list)
    box_source: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def build(self, joints: int) -> TrackSeries:
        kpts = np.stack(self.keypoints) if self.keypoints else np.zeros((0, joints, 3))
        return TrackSeries(self.track_id, self.frames, self.timestamps, np.array(self.boxes).reshape(-1, 4), kpts,
                           self.box_source, self.scores)


class SegmentRunner:
    """Runs the frames of one segment through detect/carry -> pose -> tracker (module docstring)."""

    def __init__(self, model: PoseModel, detector: PersonDetector, options: VideoOptions | None = None) -> None:
        self.model = model
        self.detector = detector
        self.options = options or VideoOptions()
        self.pipeline = TopDownPipeline(model.input_size, model.spec, flip_test=self.options.flip_test)

    def run(self, video: str | Path, plan: SegmentPlan, index: FrameIndex | None = None,
            on_frame: Callable[[int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> SegmentResult:
        """Process frames [plan.run_start, plan.end); ``on_frame(i)`` after each frame i,
        ``should_stop()`` before each (True: raise :class:`VideoCancelled`)."""
        opts = self.options
        tracker = PoseTracker(opts.tracker, self.model.spec.sigmas)
        builders: dict[int, _TrackBuilder] = {}
        carry = np.zeros((0, 4))
        first = True
        for frame in decode_frames(video, plan.run_start, plan.end, "rgb", index):
            if should_stop is not None and should_stop():
                raise VideoCancelled(f"stopped before frame {frame.index}")
            detect = first or frame.index % opts.detect_interval == 0 or len(carry) == 0
            boxes, keypoints, person_scores = self._poses(frame.image, None if detect else carry)
            first = False
            if opts.detect_interval > 1 and len(boxes):
                height, width = frame.image.shape[:2]
                carry = carried_boxes(list(keypoints), list(boxes), width, height, opts.carry)
            else:
                carry = np.zeros((0, 4))
            ids = tracker.update(boxes, keypoints if len(boxes) else None)
            for row, track_id in enumerate(ids):
                builder = builders.setdefault(track_id, _TrackBuilder(track_id))
                builder.frames.append(frame.index)
                builder.timestamps.append(frame.timestamp)
                builder.boxes.append(boxes[row].astype(np.float64))
                builder.keypoints.append(keypoints[row].astype(np.float64))
                builder.box_source.append("detected" if detect else "carried")
                builder.scores.append(float(person_scores[row]))
            if on_frame is not None:
                on_frame(frame.index)
        joints = self.model.spec.num_joints
        return SegmentResult(plan, [builders[k].build(joints) for k in sorted(builders)])

    def _poses(self, image: np.ndarray,
               carried: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes [N, 4], keypoints [N, K, 3], person scores [N]) of one frame:
        the detector's boxes (best ``max_persons``) when ``carried`` is None, else those."""
        if carried is None:
            boxes, box_scores = self.detector.detect(image)
            boxes, box_scores = boxes[: self.options.max_persons], box_scores[: self.options.max_persons]
        else:
            boxes, box_scores = carried, np.ones(len(carried), np.float32)
        joints = self.model.spec.num_joints
        if len(boxes) == 0:
            return np.zeros((0, 4)), np.zeros((0, joints, 3)), np.zeros(0)
        prepared = self.pipeline.prepare(image, boxes, box_scores)
        heatmaps = infer_in_batches(self.model.infer, prepared.crops, self.options.batch_size,
                                    self.pipeline.heatmap_shape)
        persons = self.pipeline.finish(prepared, heatmaps)
        return (np.stack([p.bbox_xywh for p in persons]).astype(np.float64),
                np.stack([p.keypoints for p in persons]).astype(np.float64),
                np.array([p.score for p in persons], np.float64))


def smooth_track(track: TrackSeries, options: VideoOptions) -> TrackSeries:
    """``track`` with its keypoints smoothed as ``options.smoothing`` says (boxes left as found)."""
    if options.smoothing == "none" or not len(track):
        return track
    if options.smoothing == "savgol":
        kpts = savgol_keypoints(track.keypoints, track.frames, options.savgol)
    else:
        kpts = one_euro_keypoints(track.keypoints, track.timestamps, options.one_euro)
    return TrackSeries(track.track_id, track.frames, track.timestamps, track.boxes, kpts, track.box_source,
                       track.scores)


def finish_result(info: VideoInfo, segments: list[SegmentResult], model: ResultModel,
                  options: VideoOptions) -> VideoResult:
    """The job's result from its segments: tracks stitched (ids by first appearance), then smoothed."""
    tracks = stitch_segments(segments, options.tracker, model.spec.sigmas)
    meta = VideoMeta(info.fps, info.frames, info.width, info.height, info.duration_s)
    return VideoResult(meta, model.name, model.version, model.spec.joint_names,
                       [smooth_track(t, options) for t in tracks], options.score_threshold)


def segment_overlap(options: VideoOptions, requested: int = 8) -> int:
    """Frames a segment runs before its start: enough to hold one detection (module docstring of
    :mod:`.stitch`) and ``requested`` frames for the tracks to meet in."""
    return max(requested, options.detect_interval)


def plan_video(video: str | Path, options: VideoOptions,
               segment_frames: int | None = None) -> tuple[VideoInfo, FrameIndex, list[SegmentPlan]]:
    """Probe ``video`` and cut it: one segment (``segment_frames`` None), or segments of at least
    ``segment_frames`` at keyframes, overlapping by :func:`segment_overlap`. Raises the probe's
    NotAVideo / NoDecodableFrames."""
    info = probe(video)
    index = read_index(video)
    if segment_frames is None:
        return info, index, [SegmentPlan(0, 0, len(index.pts))]
    return info, index, plan_segments(len(index.pts), index.keyframes, segment_frames, segment_overlap(options))


def run_video(video: str | Path, model: PoseModel, detector: PersonDetector, options: VideoOptions | None = None,
              segment_frames: int | None = None, on_frame: Callable[[int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> VideoResult:
    """The whole video in this thread: one segment, or segments of ``segment_frames`` cut at
    keyframes and run one after the other (what the Celery tasks do on several workers)."""
    options = options or VideoOptions()
    info, index, plans = plan_video(video, options, segment_frames)
    runner = SegmentRunner(model, detector, options)
    segments = [runner.run(video, plan, index, on_frame, should_stop) for plan in plans]
    return finish_result(info, segments, model, options)
