"""``ditepose stream``: send a video (or a folder of images) to StreamPose, write the results.

Frames go out as fast as the server's flow control allows (or paced with ``fps``); results
come back in order and are written as JSON lines and/or an annotated video. A client-side
window bounds how many frames are kept for annotation while their results are pending.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SENDABLE = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class SourceFrame:
    sequence_number: int
    timestamp: float
    data: bytes  # encoded JPEG/PNG/WebP
    image_bgr: np.ndarray | None  # kept only when annotating


@dataclass
class StreamSummary:
    """What one streamed video came to: counts, wall time and each result's latency."""

    frames_sent: int = 0
    results: int = 0
    dropped: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def fps(self) -> float:
        return self.results / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def describe(self) -> str:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return (
            f"{self.frames_sent} frames sent, {self.results} answered ({self.errors} with errors), "
            f"{self.dropped} dropped by the server; {self.fps:.1f} frames/s; latency ms "
            f"p50 {np.percentile(lat, 50):.1f} p95 {np.percentile(lat, 95):.1f}"
        )


def read_source(source: Path, keep_images: bool, fps: float | None = None, limit: int | None = None,
                jpeg_quality: int = 90) -> Iterator[SourceFrame]:
    """Frames of a video file or of the images in a folder (sorted by name)."""
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
        rate = fps or 30.0
        for i, path in enumerate(files[:limit]):
            image = cv2.imread(str(path), cv2.IMREAD_COLOR) if keep_images or path.suffix.lower() not in SENDABLE else None
            if path.suffix.lower() in SENDABLE:
                data = path.read_bytes()
            else:
                if image is None:
                    raise ValueError(f"cannot read image {path}")
                data = _encode(image, jpeg_quality)
            yield SourceFrame(i, i / rate, data, image if keep_images else None)
        return
    if not source.is_file():
        raise FileNotFoundError(f"no such video or folder: {source}")
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise ValueError(f"OpenCV cannot open video {source}")
    rate = fps or capture.get(cv2.CAP_PROP_FPS) or 30.0
    try:
        i = 0
        while limit is None or i < limit:
            ok, image = capture.read()
            if not ok:
                break
            yield SourceFrame(i, i / rate, _encode(image, jpeg_quality), image if keep_images else None)
            i += 1
        if i == 0:
            raise ValueError(f"video {source} has no readable frames")
    finally:
        capture.release()


def _encode(image_bgr: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


@dataclass
class _Drawn:
    keypoints: np.ndarray
    bbox_xywh: np.ndarray


def annotate(image_bgr: np.ndarray, persons: list) -> np.ndarray:
    """Skeletons, boxes and track ids drawn on a copy of the frame."""
    from ditepose.model.draw import draw_poses
    from ditepose.model.keypoints import spec_for_num_joints
    from ditepose.service.grpc.convert import keypoints_array

    if not persons:
        return image_bgr.copy()
    drawn = [_Drawn(keypoints_array(p), np.array([p.bbox.x, p.bbox.y, p.bbox.width, p.bbox.height])) for p in persons]
    spec = spec_for_num_joints(len(drawn[0].keypoints))
    rgb = draw_poses(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB), drawn, spec)
    out = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    for p in persons:
        if p.track_id:
            org = (int(p.bbox.x), max(12, int(p.bbox.y) - 4))
            cv2.putText(out, f"#{p.track_id}", org, cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 255, 255), 2, cv2.LINE_AA)
    return out


BOX_SOURCES = {1: "detected", 2: "carried", 3: "client"}  # pose_pb2.BoxSource -> the JSON word


def result_record(result) -> dict:
    """One JSON line; ``boxes`` says whether the server ran its detector on the frame ("detected"),
    carried the boxes from an earlier frame ("carried", ``--detect-interval``) or had them sent."""
    from ditepose.service.grpc.convert import person_dict

    record: dict = {
        "sequence_number": result.sequence_number,
        "timestamp": result.timestamp,
        "dropped_before": list(result.dropped_sequence_numbers),
    }
    if result.box_source in BOX_SOURCES:
        record["boxes"] = BOX_SOURCES[result.box_source]
    if result.HasField("error"):
        record["error"] = {"code": result.error.code, "message": result.error.message}
    else:
        record.update(
            model=result.model,
            image={"width": result.width, "height": result.height},
            persons=[person_dict(p) for p in result.persons],
        )
    return record


def stream_config(*, policy: str = "queue", max_in_flight: int = 4, max_queued: int = 1, model: str = "",
                  flip_test: bool = True, tracking: bool = True, smoothing: bool = False,
                  detect_interval: int = 0):  # -> pose_pb2.StreamConfig
    """The stream's opening message; ``policy`` is ``'queue'`` or ``'drop-oldest'``; ``detect_interval``
    N runs the server's person detector on every N-th frame (0: the server's default, 1: every frame)."""
    from ditepose.proto.ditepose.v1 import pose_pb2

    if policy not in ("queue", "drop-oldest"):
        raise ValueError(f"policy must be 'queue' or 'drop-oldest', got {policy!r}")
    if detect_interval < 0:
        raise ValueError(f"detect_interval must be >= 0 (0 = the server's default), got {detect_interval}")
    return pose_pb2.StreamConfig(
        options=pose_pb2.PoseOptions(model=model, flip_test=flip_test),
        policy=pose_pb2.OVERFLOW_POLICY_DROP_OLDEST if policy == "drop-oldest" else pose_pb2.OVERFLOW_POLICY_QUEUE,
        max_in_flight=max_in_flight,
        max_queued=max_queued,
        tracking=pose_pb2.TrackingConfig(enabled=tracking or smoothing),
        smoothing=pose_pb2.SmoothingConfig(enabled=smoothing),
        detect_interval=detect_interval,
    )


class _InFlight:
    """Frames sent and not yet answered (send time, image if annotating), at most ``window`` of them.

    The sender waits in :meth:`reserve` for a slot; each answer or drop settles one frame
    (:meth:`settle`), freeing its slot. :meth:`close` ends a waiting sender once the stream is over.
    """

    def __init__(self, window: int) -> None:
        self._pending: dict[int, tuple[float, np.ndarray | None]] = {}
        self._lock = threading.Lock()
        self._window = threading.Semaphore(window)
        self._closed = threading.Event()

    def reserve(self) -> bool:
        """Wait for a free slot; False once the stream is closed."""
        while not self._window.acquire(timeout=0.2):
            if self._closed.is_set():
                return False
        return True

    def sent(self, frame: SourceFrame) -> None:
        with self._lock:
            self._pending[frame.sequence_number] = (time.perf_counter(), frame.image_bgr)

    def settle(self, sequence_number: int, unknown_sent_at: float) -> tuple[float, np.ndarray | None]:
        """Forget a frame and free its slot: its send time (``unknown_sent_at`` if never sent) and image."""
        with self._lock:
            entry = self._pending.pop(sequence_number, (unknown_sent_at, None))
        self._window.release()
        return entry

    def close(self) -> None:
        self._closed.set()


def _requests(config, frames: Iterator[SourceFrame], in_flight: _InFlight, summary: StreamSummary, *,
              pace: bool, started: float) -> Iterator:  # -> Iterator[pose_pb2.StreamRequest]
    """The config, then each frame once there is room in the window (at ``started + timestamp`` if pacing)."""
    from ditepose.proto.ditepose.v1 import pose_pb2

    yield pose_pb2.StreamRequest(config=config)
    for frame in frames:
        if not in_flight.reserve():
            return
        if pace:
            delay = started + frame.timestamp - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        in_flight.sent(frame)
        summary.frames_sent += 1
        yield pose_pb2.StreamRequest(
            frame=pose_pb2.Frame(sequence_number=frame.sequence_number, timestamp=frame.timestamp, image=frame.data)
        )


class _ResultWriter:
    """Answers to JSON lines (``jsonl``) and/or a video (``out_video``).

    The video opens at its first frame, at ``fps`` or else the frame rate of ``source``.
    """

    def __init__(self, jsonl: Path | None, out_video: Path | None, fps: float | None, source: Path) -> None:
        self._jsonl = jsonl.open("w") if jsonl is not None else None
        self._out_video = out_video
        self._fps = fps
        self._source = source
        self._video: cv2.VideoWriter | None = None

    def dropped(self, image: np.ndarray | None) -> None:
        """A frame the server dropped: written bare, so the video keeps its timing."""
        self._write_frame(image)

    def answered(self, result, image: np.ndarray | None) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(result_record(result)) + "\n")
        if image is not None:
            self._write_frame(image, list(result.persons))

    def _write_frame(self, image: np.ndarray | None, persons: list | None = None) -> None:
        if self._out_video is None or image is None:
            return
        self._video = self._video or _open_writer(self._out_video, image, self._fps or _source_fps(self._source))
        self._video.write(image if persons is None else annotate(image, persons))

    def close(self) -> None:
        if self._video is not None:
            self._video.release()
        if self._jsonl is not None:
            self._jsonl.close()


def _receive(results: Iterator, in_flight: _InFlight, writer: _ResultWriter, summary: StreamSummary) -> None:
    """Settle, count and write each result (and the frames it says were dropped before it)."""
    for result in results:
        now = time.perf_counter()
        for seq in result.dropped_sequence_numbers:
            _, image = in_flight.settle(seq, 0.0)
            summary.dropped += 1
            writer.dropped(image)
        sent_at, image = in_flight.settle(result.sequence_number, now)
        summary.results += 1
        summary.latencies_ms.append((now - sent_at) * 1000.0)
        if result.HasField("error"):
            summary.errors += 1
        writer.answered(result, image)


def run_stream(
    source: Path,
    target: str,
    *,
    out_video: Path | None = None,
    jsonl: Path | None = None,
    policy: str = "queue",
    max_in_flight: int = 4,
    max_queued: int = 1,
    model: str = "",
    flip_test: bool = True,
    tracking: bool = True,
    smoothing: bool = False,
    detect_interval: int = 0,
    fps: float | None = None,
    pace: bool = False,
    limit: int | None = None,
    api_key: str | None = None,
    timeout_s: float | None = None,
) -> StreamSummary:
    """Stream ``source`` to ``target`` and write what came back; returns counts and latencies."""
    import grpc

    from ditepose.proto.ditepose.v1 import pose_pb2_grpc

    config = stream_config(policy=policy, max_in_flight=max_in_flight, max_queued=max_queued, model=model,
                           flip_test=flip_test, tracking=tracking, smoothing=smoothing,
                           detect_interval=detect_interval)
    frames = read_source(source, out_video is not None, fps, limit)
    in_flight = _InFlight(max(8, 4 * (max_in_flight + max_queued)))
    summary = StreamSummary()
    started = time.perf_counter()
    writer = _ResultWriter(jsonl, out_video, fps, source)
    metadata = (("x-api-key", api_key),) if api_key else None
    try:
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
            stub = pose_pb2_grpc.PoseServiceStub(channel)
            requests = _requests(config, frames, in_flight, summary, pace=pace, started=started)
            _receive(stub.StreamPose(requests, metadata=metadata, timeout=timeout_s), in_flight, writer, summary)
    finally:
        in_flight.close()
        summary.elapsed_s = time.perf_counter() - started
        writer.close()
    return summary


def _source_fps(source: Path) -> float:
    if source.is_dir():
        return 30.0
    capture = cv2.VideoCapture(str(source))
    try:
        return capture.get(cv2.CAP_PROP_FPS) or 30.0
    finally:
        capture.release()


def _open_writer(path: Path, first: np.ndarray, fps: float) -> cv2.VideoWriter:
    height, width = first.shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise ValueError(f"OpenCV cannot write video {path}")
    return writer
