"""The video job's files without a server: the upload sink (limit, signature), the catalogue's names,
the expiry sweep (with the embedded store), the segment plan the API stores."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ditepose.service.core.settings import Settings
from ditepose.service.jobs.catalogue import BadName, UnknownName
from ditepose.service.jobs.records import JobRecord, LocalJobStore
from ditepose.service.jobs.video import (
    NotAVideoFile,
    UploadSink,
    UploadTooLarge,
    catalogue_video,
    plan_video_job,
    sniff_container,
    sweep_expired,
)
from ditepose.service.jobs.video_schemas import VideoJobOptions
from ditepose.service.video.synthetic import riders_camera, write_riders_clip

MP4_HEAD = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00"


def test_sniff_names_the_containers_and_nothing_else() -> None:
    assert sniff_container(MP4_HEAD) == ".mp4"
    assert sniff_container(b"\x1a\x45\xdf\xa3" + b"\0" * 12) == ".mkv"
    assert sniff_container(b"RIFF\x10\x00\x00\x00AVI LIST") == ".avi"
    for other in (b"RIFF\x10\x00\x00\x00WAVEfmt ", b"\x89PNG\r\n\x1a\n\0\0\0\0", b"%PDF-1.7\n" + b"\0" * 8, b""):
        assert sniff_container(other) is None


def test_upload_sink_stops_at_the_limit_and_checks_the_head_early(tmp_path: Path) -> None:
    sink = UploadSink(tmp_path, max_bytes=64)
    sink.write(MP4_HEAD)
    with pytest.raises(UploadTooLarge):
        sink.write(b"\0" * 60)  # 76 bytes in all: past the limit before anything more is kept
    sink.discard()
    text = UploadSink(tmp_path, max_bytes=1 << 20)
    with pytest.raises(NotAVideoFile):
        text.write(b"hello, this is not a video at all")  # refused on the first chunk, not at the end
    text.discard()
    short = UploadSink(tmp_path, max_bytes=1 << 20)
    short.write(b"\x1a\x45")
    with pytest.raises(NotAVideoFile):
        short.finish()
    short.discard()
    ok = UploadSink(tmp_path, max_bytes=1 << 20)
    data = MP4_HEAD + b"\0" * 4096
    for i in range(0, len(data), 7):  # chunks of any size, the head split across them
        ok.write(data[i:i + 7])
    assert ok.finish().read_bytes() == data and ok.suffix == ".mp4"
    ok.discard()
    assert list(tmp_path.iterdir()) == []


def test_catalogue_names_entries_and_folder_files_never_paths(tmp_path: Path) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "walk.mp4").write_bytes(MP4_HEAD)
    (folder / "notes.txt").write_text("x")
    (tmp_path / "secret.mp4").write_bytes(MP4_HEAD)
    os.symlink(tmp_path / "secret.mp4", folder / "link.mp4")
    settings = Settings(_env_file=None, videos={"run": tmp_path / "secret.mp4"}, video_dir=folder)
    assert catalogue_video(settings, "run") == tmp_path / "secret.mp4"
    assert catalogue_video(settings, "walk.mp4") == (folder / "walk.mp4").resolve()
    for unknown in ("notes.txt", "link.mp4", "missing.mp4"):
        with pytest.raises(UnknownName):
            catalogue_video(settings, unknown)
    for bad in ("../secret.mp4", "/etc/passwd", "a/b.mp4", ""):
        with pytest.raises(BadName):
            catalogue_video(settings, bad)


def test_sweep_deletes_what_expired_and_keeps_the_rest(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, jobs_dir=tmp_path, video_result_ttl_s=100.0)
    store = LocalJobStore()
    now = time.time()
    root = tmp_path / "videos"
    jobs = {"old-done": ("succeeded", now - 500), "new-done": ("failed", now - 10), "old-running": ("running", None)}
    for job_id, (state, finished) in jobs.items():
        store.create(JobRecord(id=job_id, state=state, created_at=now - 1000, finished_at=finished, kind="video"))
        (root / job_id).mkdir(parents=True)
        (root / job_id / "result.json").write_text("{}")
    (root / "orphan").mkdir()  # a folder whose record is gone (e.g. Redis was flushed)
    os.utime(root / "orphan", (now - 500, now - 500))
    (root / "fresh-orphan").mkdir()
    stale, fresh = root / ".upload-a.part", root / ".upload-b.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (now - 500, now - 500))
    swept = sweep_expired(settings, store, now=now)
    assert sorted(swept) == ["old-done", "orphan"]
    assert sorted(p.name for p in root.iterdir()) == [".upload-b.part", "fresh-orphan", "new-done", "old-running"]


def test_the_plan_cuts_at_keyframes_with_overlap(tmp_path: Path) -> None:
    clip = tmp_path / "r.mp4"
    write_riders_clip(clip, riders_camera(frames=60), gop=20)
    settings = Settings(_env_file=None, jobs_dir=tmp_path, video_segment_s=0.5, video_overlap_frames=4)
    plan = plan_video_job(settings, settings.models[0], clip, tmp_path / "job", VideoJobOptions(detect_interval=6))
    # 15-frame segments wanted at 30 frames/s; cuts only at keyframes 0, 20, 40; overlap max(4, 6)
    assert plan.segments == [[0, 0, 20], [14, 20, 40], [34, 40, 60]]
    assert plan.frames_total == 60 and plan.video_options().detect_interval == 6
    assert plan.detector == "nanodet" and plan.options["max_persons"] is None
    assert plan.video_options().max_persons == 20


def test_redis_down_refuses_the_video_and_keeps_no_file(tmp_path: Path) -> None:
    """Nothing listens on the Redis port: the probed upload is not turned into a job (503 at the
    route: BrokerUnavailable) and its folder is gone."""
    from ditepose.service.jobs.executor import BrokerUnavailable
    from ditepose.service.jobs.manager import JobService
    from tests.support import free_port

    clip = tmp_path / "r.mp4"
    write_riders_clip(clip, riders_camera(frames=8), gop=8)
    upload = tmp_path / "jobs" / "videos" / ".upload-x.part"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(clip.read_bytes())
    service = JobService(Settings(_env_file=None, jobs_dir=tmp_path / "jobs", redis_timeout_s=0.5,
                                  redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        with pytest.raises(BrokerUnavailable):
            service.submit_video(VideoJobOptions(), upload, ".mp4")
    finally:
        service.close()
    assert [p.name for p in (tmp_path / "jobs" / "videos").iterdir()] == []
