"""Video fixtures made at test time (nothing binary in the repository): the riders clip with its
known camera path, and small clips in every codec the decoder must read."""

from __future__ import annotations

from pathlib import Path

import pytest

from ditepose.service.video.synthetic import CODECS, CameraPath, write_codec_clip, write_riders_clip


@pytest.fixture(scope="session")
def riders_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CameraPath]:
    """90 frames of H.264, 640x360 at 30 frames/s, keyframes at 0, 30 and 60."""
    path = tmp_path_factory.mktemp("riders") / "riders.mp4"
    return path, write_riders_clip(path, gop=30)


@pytest.fixture(scope="session")
def codec_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """10 frames of the moving-square pattern per codec, a keyframe every 4 frames where the
    codec has inter frames."""
    folder = tmp_path_factory.mktemp("codecs")
    return {codec: write_codec_clip(folder, codec, frames=10, gop=4) for codec in CODECS}
