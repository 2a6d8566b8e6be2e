"""Video files in, decoded frames out, through PyAV (FFmpeg's bindings): probe, frames, segments.

Why an index of packets: a frame's *index* (0, 1, 2, ... in display order) is what the rest of
the video path talks about (detection every N frames, segments [start, end), the results'
``frames``), but a container only knows presentation timestamps (pts) and decodes in another
order when it has B-frames. :func:`read_index` demuxes the video stream once without decoding
(cheap: no pixels), sorts the packets' pts and so names every frame: frame i is the i-th
smallest pts. That is exact for variable frame rates too, gives the frame count without trusting
the container's header, and says which frames are keyframes, so a long video can be cut where
a decoder can start (:func:`keyframe_indices`). Decoding a segment seeks to the keyframe at or
before its first frame and drops the frames before it.

Timestamps are in seconds from the first frame: ``(pts - first_pts) * time_base``, so a video
whose stream starts at a non-zero pts (edit lists, cut recordings) still starts at 0.0.

Frames are produced one at a time (a generator); nothing here holds a whole video in memory.
The errors say which of the two bad inputs a file is: :class:`NotAVideo` (no container, no
video stream: the service answers 415) or :class:`NoDecodableFrames` (a video stream that yields
no picture, e.g. a header without frames or cut before its first frame: 422). A file that
ends inside a container header FFmpeg recognised counts as the second.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np

PixelFormat = Literal["rgb", "bgr"]
_AV_FORMATS = {"rgb": "rgb24", "bgr": "bgr24"}


class VideoError(ValueError):
    """A file the video path cannot use; the subclasses say why."""


class NotAVideo(VideoError):
    """No container FFmpeg can open, or a container without a video stream."""


class NoVideoStream(NotAVideo):
    """A container FFmpeg opens that holds no video stream (audio only, subtitles)."""


class NoDecodableFrames(VideoError):
    """A video stream from which not one frame decodes."""


@dataclass(frozen=True)
class VideoInfo:
    """What a probe finds: the container and codec names, and the stream's geometry and timing."""

    container: str  # FFmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"
    codec: str  # e.g. "h264", "hevc", "vp9", "mjpeg"
    width: int
    height: int
    fps: float  # average frame rate (frames / duration when the header has none)
    frames: int  # counted from the packets, not taken from the header
    duration_s: float


@dataclass(frozen=True)
class DecodedFrame:
    """One picture: its display-order index, its time in seconds from the first frame, its pixels."""

    index: int
    timestamp: float
    image: np.ndarray  # uint8 [H, W, 3], RGB or BGR as asked


@dataclass(frozen=True)
class FrameIndex:
    """Every frame's pts in display order and which frames are keyframes (module docstring)."""

    pts: tuple[int, ...]
    keyframes: tuple[int, ...]  # frame indices, ascending; 0 is the first decodable point
    time_base: Fraction

    def seconds(self, pts: int) -> float:
        return float((pts - self.pts[0]) * self.time_base) if self.pts else 0.0


def _open(path: str | Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r")
    except av.error.EOFError:  # a container header (e.g. Matroska's) and then nothing
        raise NoDecodableFrames(f"{Path(path).name}: the file ends before its first frame") from None
    except av.error.FFmpegError as exc:  # its str() names the server-side path: say only why
        raise NotAVideo(f"{Path(path).name}: not a video FFmpeg can open ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise NotAVideo(f"{Path(path).name}: not a video FFmpeg can open") from None


def _video_stream(container: av.container.InputContainer, path: str | Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise NoVideoStream(f"{Path(path).name}: the file has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame threads: several times faster on long H.264 files
    return stream


def read_index(path: str | Path) -> FrameIndex:
    """Demux the first video stream (no decoding) and name its frames (module docstring)."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        entries: list[tuple[int, bool]] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's flush packet
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is None:
                    continue
                entries.append((int(stamp), bool(packet.is_keyframe)))
        except av.error.FFmpegError:
            pass  # a cut file: keep the packets read up to the damage
        time_base = stream.time_base or Fraction(1, 1)
    entries.sort()
    keyframes = [i for i, (_, key) in enumerate(entries) if key]
    if entries and (not keyframes or keyframes[0] != 0):
        keyframes.insert(0, 0)  # decoding from the start always works
    return FrameIndex(tuple(p for p, _ in entries), tuple(keyframes), Fraction(time_base))


def probe(path: str | Path) -> VideoInfo:
    """Container, codec, size, fps, frame count and duration; raises NotAVideo/NoDecodableFrames.

    Decodes the first frame too: a header promising frames proves nothing."""
    index = read_index(path)
    with _open(path) as container:
        stream = _video_stream(container, path)
        codec = stream.codec_context.name
        container_name = container.format.name
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate
    if not index.pts or next(decode_frames(path, index=index), None) is None:
        raise NoDecodableFrames(f"{Path(path).name}: a {codec} video stream without one decodable frame")
    frames = len(index.pts)
    span = index.seconds(index.pts[-1])
    fps = float(rate) if rate else (frames - 1) / span if span > 0 else 0.0
    duration = span + (1.0 / fps if fps > 0 else 0.0)  # the last frame lasts one frame
    return VideoInfo(container_name, codec, int(width), int(height), fps, frames, duration)


def keyframe_indices(path: str | Path) -> list[int]:
    """The frames a decoder can start at (ascending, 0 first): where a long video can be cut."""
    return list(read_index(path).keyframes)


def decode_frames(
    path: str | Path, start: int = 0, end: int | None = None, pixel_format: PixelFormat = "rgb",
    index: FrameIndex | None = None,
) -> Iterator[DecodedFrame]:
    """The frames [start, end) in display order, one at a time (``end`` None: to the last).

    Seeks to the keyframe at or before ``start``; ``index`` saves demuxing again when the caller
    has it (:func:`read_index`). A frame that fails to decode is skipped (its index is missing
    from the output); the caller sees the gap in ``index``."""
    if pixel_format not in _AV_FORMATS:
        raise ValueError(f"pixel_format must be one of {sorted(_AV_FORMATS)}, got {pixel_format!r}")
    index = index or read_index(path)
    stop = len(index.pts) if end is None else min(end, len(index.pts))
    if start < 0 or start >= stop:
        return
    position = {pts: i for i, pts in enumerate(index.pts)}
    keyframe = max(k for k in index.keyframes if k <= start)
    yield from _decode_from(path, index, keyframe, start, stop, position, _AV_FORMATS[pixel_format])


def _decode_from(
    path: str | Path, index: FrameIndex, keyframe: int, start: int, stop: int,
    position: dict[int, int], av_format: str,
) -> Iterator[DecodedFrame]:
    with _open(path) as container:
        stream = _video_stream(container, path)
        if keyframe > 0:
            container.seek(index.pts[keyframe], stream=stream, backward=True, any_frame=False)
        counted = keyframe - 1  # for frames without a pts: count on from the last known one
        try:
            for frame in container.decode(stream):
                i = counted + 1 if frame.pts is None else position.get(frame.pts, counted + 1)
                if counted == keyframe - 1 and keyframe > 0 and i > start:
                    # the seek landed after the frame we need: decode from the beginning instead
                    yield from _decode_from(path, index, 0, start, stop, position, av_format)
                    return
                counted = i
                if i >= stop:
                    break
                if i >= start:
                    yield DecodedFrame(i, index.seconds(index.pts[i]), frame.to_ndarray(format=av_format))
        except av.error.FFmpegError:
            return  # damaged data past this point: the frames so far are what the file holds
