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


def result_record(result) -> dict:
    from ditepose.service.grpc.convert import person_dict

    record: dict = {
        "sequence_number": result.sequence_number,
        "timestamp": result.timestamp,
        "dropped_before": list(result.dropped_sequence_numbers),
    }
    if result.HasField("error"):
        record["error"] = {"code": result.error.code, "message": result.error.message}
    else:
        record.update(
            model=result.model,
            image={"width": result.width, "height": result.height},
            persons=[person_dict(p) for p in result.persons],
        )
    return record


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
    fps: float | None = None,
    pace: bool = False,
    limit: int | None = None,
    api_key: str | None = None,
    timeout_s: float | None = None,
) -> StreamSummary:
    """Stream ``source`` to ``target`` and write what came back; returns counts and latencies."""
    import grpc

    from ditepose.proto.ditepose.v1 import pose_pb2, pose_pb2_grpc

    if policy not in ("queue", "drop-oldest"):
        raise ValueError(f"policy must be 'queue' or 'drop-oldest', got {policy!r}")
    config = pose_pb2.StreamConfig(
        options=pose_pb2.PoseOptions(model=model, flip_test=flip_test),
        policy=pose_pb2.OVERFLOW_POLICY_DROP_OLDEST if policy == "drop-oldest" else pose_pb2.OVERFLOW_POLICY_QUEUE,
        max_in_flight=max_in_flight,
        max_queued=max_queued,
        tracking=pose_pb2.TrackingConfig(enabled=tracking or smoothing),
        smoothing=pose_pb2.SmoothingConfig(enabled=smoothing),
    )
    keep = out_video is not None
    frames = read_source(source, keep, fps, limit)
    pending: dict[int, tuple[float, np.ndarray | None]] = {}
    lock = threading.Lock()
    window = threading.Semaphore(max(8, 4 * (max_in_flight + max_queued)))
    done = threading.Event()
    summary = StreamSummary()
    started = time.perf_counter()

    def requests() -> Iterator[pose_pb2.StreamRequest]:
        yield pose_pb2.StreamRequest(config=config)
        for frame in frames:
            while not window.acquire(timeout=0.2):
                if done.is_set():
                    return
            if pace:
                delay = started + frame.timestamp - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            with lock:
                pending[frame.sequence_number] = (time.perf_counter(), frame.image_bgr)
                summary.frames_sent += 1
            yield pose_pb2.StreamRequest(
                frame=pose_pb2.Frame(sequence_number=frame.sequence_number, timestamp=frame.timestamp, image=frame.data)
            )

    writer = None
    jsonl_file = jsonl.open("w") if jsonl is not None else None
    metadata = (("x-api-key", api_key),) if api_key else None
    try:
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
            stub = pose_pb2_grpc.PoseServiceStub(channel)
            for result in stub.StreamPose(requests(), metadata=metadata, timeout=timeout_s):
                now = time.perf_counter()
                for seq in result.dropped_sequence_numbers:
                    with lock:
                        _, image = pending.pop(seq, (0.0, None))
                    window.release()
                    summary.dropped += 1
                    if out_video is not None and image is not None:
                        writer = writer or _open_writer(out_video, image, fps or _source_fps(source))
                        writer.write(image)  # keep the video's timing; no skeleton for a dropped frame
                with lock:
                    sent_at, image = pending.pop(result.sequence_number, (now, None))
                window.release()
                summary.results += 1
                summary.latencies_ms.append((now - sent_at) * 1000.0)
                if result.HasField("error"):
                    summary.errors += 1
                if jsonl_file is not None:
                    jsonl_file.write(json.dumps(result_record(result)) + "\n")
                if out_video is not None and image is not None:
                    writer = writer or _open_writer(out_video, image, fps or _source_fps(source))
                    writer.write(annotate(image, list(result.persons)))
    finally:
        done.set()
        summary.elapsed_s = time.perf_counter() - started
        if writer is not None:
            writer.release()
        if jsonl_file is not None:
            jsonl_file.close()
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
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise ValueError(f"OpenCV cannot write video {path}")
    return writer
