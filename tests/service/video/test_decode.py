"""Decoding with PyAV: probe, frames in display order with timestamps, segments from keyframes,
and the two kinds of bad input (not a video; a video without a decodable frame)."""

from __future__ import annotations

import types
from pathlib import Path

import av
import numpy as np
import pytest

from ditepose.service.video.decode import (
    NoDecodableFrames,
    NotAVideo,
    decode_frames,
    keyframe_indices,
    probe,
    read_index,
)
from ditepose.service.video.synthetic import CameraPath, pattern_frames

CONTAINERS = {"h264": "mp4", "hevc": "matroska", "vp9": "webm", "mjpeg": "avi"}


def square_x(image: np.ndarray) -> int:
    """Left edge of the pattern's white square (rows 32..64), read back from decoded pixels."""
    band = image[40:56].astype(np.int32).min(axis=2).mean(axis=0)
    return int(np.flatnonzero(band > 235)[0])


def test_probe_riders_clip(riders_clip: tuple[Path, CameraPath]) -> None:
    info = probe(riders_clip[0])
    assert (info.codec, info.width, info.height, info.frames) == ("h264", 640, 360, 90)
    assert "mp4" in info.container
    assert info.fps == pytest.approx(30.0)
    assert info.duration_s == pytest.approx(3.0)
    assert keyframe_indices(riders_clip[0]) == [0, 30, 60]


@pytest.mark.parametrize("codec", sorted(CONTAINERS))
def test_every_codec_decodes_in_order_with_timestamps(codec: str, codec_clips: dict[str, Path]) -> None:
    path = codec_clips[codec]
    info = probe(path)
    assert info.codec == codec and CONTAINERS[codec] in info.container
    assert (info.width, info.height, info.frames) == (160, 96, 10)
    frames = list(decode_frames(path))
    assert [f.index for f in frames] == list(range(10))
    assert [f.timestamp for f in frames] == pytest.approx([i / 25 for i in range(10)])
    expected = [square_x(img) for img in pattern_frames(10)]
    assert [square_x(f.image) for f in frames] == pytest.approx(expected, abs=2)
    assert frames[0].image.shape == (96, 160, 3) and frames[0].image.dtype == np.uint8


@pytest.mark.parametrize("codec", sorted(CONTAINERS))
def test_a_segment_decodes_as_the_whole_video_does(codec: str, codec_clips: dict[str, Path]) -> None:
    path = codec_clips[codec]
    whole = list(decode_frames(path))
    keys = keyframe_indices(path)
    assert keys[0] == 0 and (codec == "mjpeg" or keys == [0, 4, 8])
    part = list(decode_frames(path, 5, 9))
    assert [f.index for f in part] == [5, 6, 7, 8]
    for got, want in zip(part, whole[5:9], strict=True):
        assert got.timestamp == want.timestamp
        np.testing.assert_array_equal(got.image, want.image)


def test_frames_come_one_at_a_time_as_rgb_or_bgr(riders_clip: tuple[Path, CameraPath]) -> None:
    path = riders_clip[0]
    index = read_index(path)
    rgb = decode_frames(path, 31, 33, "rgb", index)
    assert isinstance(rgb, types.GeneratorType)  # nothing decoded before it is asked for
    bgr = list(decode_frames(path, 31, 33, "bgr", index))
    for a, b in zip(rgb, bgr, strict=True):
        np.testing.assert_array_equal(a.image, b.image[..., ::-1])
    assert list(decode_frames(path, 95, 99)) == []
    with pytest.raises(ValueError, match="pixel_format"):
        list(decode_frames(path, pixel_format="yuv"))  # type: ignore[arg-type]


def test_b_frames_are_put_in_display_order(tmp_path: Path) -> None:
    """libx264's default GOP has B-frames: packets come out of display order; frames must not."""
    path = tmp_path / "bframes.mp4"
    container = av.open(str(path), mode="w")
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
    stream.options = {"bf": "3", "preset": "medium"}
    for image in pattern_frames(12):
        container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
    container.mux(stream.encode(None))
    container.close()
    frames = list(decode_frames(path))
    assert [f.index for f in frames] == list(range(12))
    assert [square_x(f.image) for f in frames] == pytest.approx([square_x(i) for i in pattern_frames(12)], abs=2)


def test_not_a_video(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("hello, this is not a video\n" * 20)
    with pytest.raises(NotAVideo, match="not a video"):
        probe(text)
    audio = tmp_path / "sound.m4a"
    container = av.open(str(audio), mode="w")
    container.add_stream("aac", rate=8000)
    container.start_encoding()
    container.close()
    with pytest.raises(NotAVideo, match="no video stream"):
        probe(audio)


def test_a_truncated_mp4_is_refused(riders_clip: tuple[Path, CameraPath], tmp_path: Path) -> None:
    data = riders_clip[0].read_bytes()  # moov at the end: half a file has no index at all
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(NotAVideo):
        probe(cut)


def test_a_video_without_decodable_frames(tmp_path: Path) -> None:
    """An MP4 whose index (moov first) promises frames whose data is missing."""
    path = tmp_path / "whole.mp4"
    container = av.open(str(path), mode="w", options={"movflags": "faststart"})
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
    for image in pattern_frames(10):
        container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
    container.mux(stream.encode(None))
    container.close()
    data = path.read_bytes()
    cut = tmp_path / "no_frames.mp4"
    cut.write_bytes(data[: data.find(b"mdat") + 20])
    with pytest.raises(NoDecodableFrames):
        probe(cut)
    empty = tmp_path / "empty.mkv"  # a Matroska header with a video track and no frame at all
    container = av.open(str(empty), mode="w")
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    container.start_encoding()
    container.close()
    with pytest.raises(NoDecodableFrames):
        probe(empty)
