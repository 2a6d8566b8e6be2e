"""Test videos with known motion, made from a real photo, and small clips in every codec we decode.

:func:`write_riders_clip` pans and zooms a virtual camera over ``docs/riders.jpg`` (two riders
on a beach, 640x424) and encodes the result as H.264 through PyAV. Each frame is the photo under
an affine map ``dst = zoom * (src - origin)`` (no rotation), kept per frame in
:class:`CameraPath`, so a test can say where each rider's box must be in every frame
(:meth:`CameraPath.box_in_frame`) and check that the tracks follow it.

:data:`RIDER_BOXES` are the riders' boxes in the photo: NanoDet's two rider detections on the
still image, rounded to whole pixels (a third box it finds covers the right rider with her
horse's head).

:func:`write_codec_clip` writes a few frames of a moving pattern in a given codec and container
(H.264/MP4, H.265/MKV, VP9/WebM, MJPEG/AVI) for the decoding tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

RIDERS_PHOTO = Path(__file__).resolve().parents[2] / "docs" / "riders.jpg"
RIDER_BOXES: tuple[tuple[float, float, float, float], ...] = ((239.0, 129.0, 77.0, 116.0), (361.0, 113.0, 62.0, 127.0))

# (encoder, container suffix, pixel format, encoder options)
CODECS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "h264": ("libx264", "mp4", "yuv420p", {"preset": "veryfast", "crf": "20"}),
    "hevc": ("libx265", "mkv", "yuv420p", {"preset": "ultrafast", "x265-params": "log-level=error"}),
    "vp9": ("libvpx-vp9", "webm", "yuv420p", {"deadline": "realtime", "cpu-used": "8"}),
    "mjpeg": ("mjpeg", "avi", "yuvj420p", {}),
}


@dataclass(frozen=True)
class CameraPath:
    """The virtual camera of each frame: output pixel = zoom * (photo pixel - origin)."""

    origins: np.ndarray  # [F, 2] photo pixel at the output's top-left corner
    zooms: np.ndarray  # [F] output pixels per photo pixel
    size_wh: tuple[int, int]
    fps: int

    @property
    def frames(self) -> int:
        return len(self.zooms)

    def affine(self, frame: int) -> np.ndarray:
        """The 2x3 map photo -> frame ``frame`` (what cv2.warpAffine was given)."""
        z, (ox, oy) = float(self.zooms[frame]), self.origins[frame]
        return np.array([[z, 0.0, -z * ox], [0.0, z, -z * oy]], np.float64)

    def box_in_frame(self, box_xywh: Iterable[float], frame: int) -> np.ndarray:
        """A photo box xywh where frame ``frame`` shows it."""
        x, y, w, h = (float(v) for v in box_xywh)
        z, (ox, oy) = float(self.zooms[frame]), self.origins[frame]
        return np.array([z * (x - ox), z * (y - oy), z * w, z * h], np.float64)


def riders_camera(frames: int = 90, size_wh: tuple[int, int] = (640, 360), fps: int = 30) -> CameraPath:
    """A smooth pan right and down while zooming in from 1.0 to 1.3 (both riders stay in view)."""
    t = np.linspace(0.0, 1.0, frames)
    ease = 0.5 - 0.5 * np.cos(np.pi * t)  # starts and ends slowly, like a camera operator
    zooms = 1.0 + 0.3 * ease
    origins = np.stack([10.0 + 90.0 * ease, 20.0 + 40.0 * ease], axis=1)
    return CameraPath(origins, zooms, size_wh, fps)


def _open_encoder(path: Path, codec: str, size_wh: tuple[int, int], fps: int | Fraction,
                  gop: int | None = None) -> tuple[av.container.OutputContainer, av.video.stream.VideoStream]:
    encoder, _, pix_fmt, options = CODECS[codec]
    container = av.open(str(path), mode="w")
    stream = container.add_stream(encoder, rate=Fraction(fps))
    if not isinstance(stream, av.video.stream.VideoStream):  # narrows add_stream's union for mypy
        raise TypeError(f"{encoder} is not a video encoder")
    stream.width, stream.height = size_wh
    stream.pix_fmt = pix_fmt
    stream.options = dict(options)
    if gop is not None:
        stream.codec_context.gop_size = gop
    return container, stream


def encode_frames(path: str | Path, frames: Iterable[np.ndarray], codec: str = "h264", fps: int | Fraction = 30,
                  gop: int | None = None) -> Path:
    """Encode RGB uint8 frames (all one size, even width and height) into ``path``."""
    path = Path(path)
    container = stream = None
    try:
        for image in frames:
            if container is None or stream is None:
                container, stream = _open_encoder(path, codec, (image.shape[1], image.shape[0]), fps, gop)
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            container.mux(stream.encode(video_frame))
        if container is None or stream is None:
            raise ValueError("no frames to encode")
        container.mux(stream.encode(None))  # flush the encoder's delayed frames
    finally:
        if container is not None:
            container.close()
    return path


def render_riders_frames(camera: CameraPath, photo: Path = RIDERS_PHOTO) -> Iterable[np.ndarray]:
    """The camera's frames, one at a time (RGB)."""
    image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read {photo}")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    for frame in range(camera.frames):
        yield cv2.warpAffine(rgb, camera.affine(frame), camera.size_wh, flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)


def write_riders_clip(path: str | Path, camera: CameraPath | None = None, gop: int = 30) -> CameraPath:
    """The riders clip as H.264 in ``path`` (keyframe every ``gop`` frames); returns its camera."""
    camera = camera or riders_camera()
    encode_frames(path, render_riders_frames(camera), "h264", camera.fps, gop)
    return camera


def pattern_frames(frames: int = 10, size_wh: tuple[int, int] = (160, 96)) -> list[np.ndarray]:
    """A white square moving right on a grey ramp: frame i is told apart by the square's place."""
    width, height = size_wh
    ramp = np.tile(np.linspace(40, 200, width, dtype=np.uint8)[None, :, None], (height, 1, 3))
    out = []
    for i in range(frames):
        image = ramp.copy()
        x = 8 + 10 * i
        image[32:64, x : x + 24] = 255
        out.append(image)
    return out


def write_codec_clip(folder: str | Path, codec: str, frames: int = 10, gop: int | None = None) -> Path:
    """``pattern_frames`` encoded with ``codec`` ("h264", "hevc", "vp9", "mjpeg") in its container."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    path = Path(folder) / f"pattern_{codec}.{CODECS[codec][1]}"
    return encode_frames(path, pattern_frames(frames), codec, fps=25, gop=gop)
