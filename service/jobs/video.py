"""Video jobs, the API side: uploads on disk, the catalogue of server videos, the plan, the sweep.

A video job is planned entirely by the API when it accepts the video: the probe (PyAV,
:mod:`ditepose.service.video.decode`) already read the frame index, so the API cuts the video at
keyframes into segments (:func:`~ditepose.service.video.offline.plan_video`'s rule, segments of
about ``video_segment_s``) and stores one record per segment next to the job's. Each segment is
one task (:mod:`ditepose.service.jobs.video_run`); the last one to finish merges. A short video is
one segment, so every video job runs the same way in Celery and embedded mode.

Files live under ``jobs_dir/videos/<job id>/``: ``input.<ext>`` (an upload; a catalogue video is
read where it is), ``segments/<i>.json`` and the results (``result.json``, ``result.csv``,
``result.coco.json``, ``result.mp4``). :func:`sweep_expired` deletes a finished job's folder
``video_result_ttl_s`` after it ended.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from ditepose.service.core.detection import detector_options
from ditepose.service.core.settings import ModelSpec, Settings
from ditepose.service.jobs.catalogue import UnknownName, check_name
from ditepose.service.jobs.plan import job_detector_name
from ditepose.service.jobs.records import TERMINAL, JobStore
from ditepose.service.jobs.video_schemas import VideoJobOptions
from ditepose.service.video.decode import VideoInfo, probe, read_index
from ditepose.service.video.offline import VideoOptions, segment_overlap
from ditepose.service.video.stitch import SegmentPlan, plan_segments

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
SNIFF_BYTES = 16
RESULT_FILES = {"json": "result.json", "csv": "result.csv", "coco": "result.coco.json", "mp4": "result.mp4"}
MEDIA_TYPES = {"json": "application/json", "csv": "text/csv", "coco": "application/json", "mp4": "video/mp4"}


class UploadTooLarge(ValueError):
    """The upload passed ``video_max_upload_bytes`` (HTTP 413)."""


class NotAVideoFile(ValueError):
    """The first bytes are no container the service reads (HTTP 415)."""


def sniff_container(head: bytes) -> str | None:
    """The container the first bytes name (``.mp4`` for MP4/MOV, ``.mkv`` for Matroska/WebM,
    ``.avi``), or None: what a client calls a video is checked before FFmpeg sees it."""
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return ".mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return ".mkv"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return ".avi"
    return None


class UploadSink:
    """An upload written to disk chunk by chunk, never held whole: stops at ``max_bytes`` and checks
    the container's signature once the first bytes are in. The caller feeds :meth:`write` and then
    :meth:`finish`, or :meth:`discard` on any error."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f".upload-{uuid.uuid4().hex}.part"
        self.max_bytes = max_bytes
        self.size = 0
        self.suffix: str | None = None
        self._head = b""
        self._file: IO[bytes] | None = open(self.path, "wb")  # noqa: SIM115 - closed by finish()/discard()

    def write(self, chunk: bytes) -> None:
        assert self._file is not None
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise UploadTooLarge(f"the video is larger than the limit of {self.max_bytes} bytes "
                                 "(DITEPOSE_VIDEO_MAX_UPLOAD_BYTES)")
        if self.suffix is None and len(self._head) < SNIFF_BYTES:
            self._head += chunk[: SNIFF_BYTES - len(self._head)]
            if len(self._head) >= SNIFF_BYTES:
                self._check_head()
        self._file.write(chunk)

    def _check_head(self) -> None:
        self.suffix = sniff_container(self._head)
        if self.suffix is None:
            raise NotAVideoFile("the upload is not a video container the service reads (MP4/MOV, MKV/WebM, AVI)")

    def finish(self) -> Path:
        """Close the file; raises :class:`NotAVideoFile` for an empty or too short upload."""
        assert self._file is not None
        self._file.close()
        self._file = None
        if self.suffix is None:
            self._check_head()
        return self.path

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


def videos_root(settings: Settings) -> Path:
    return Path(settings.jobs_dir) / "videos"


def job_folder(settings: Settings, job_id: str) -> Path:
    """Where a video job's upload, segment files and results live."""
    return videos_root(settings) / job_id


def catalogue_video(settings: Settings, name: str) -> Path:
    """A server-side video by name: an entry of ``videos``, else a file of ``video_dir`` (never a path
    from the client: :func:`check_name` refuses separators and ``..``). Raises UnknownName."""
    check_name("video", name)
    if name in settings.videos:
        return Path(settings.videos[name])
    if settings.video_dir is not None:
        folder = settings.video_dir.resolve()
        path = (folder / name).resolve()
        if path.parent == folder and path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
            return path
    known = sorted(settings.videos)
    raise UnknownName(f"unknown video {name!r} (catalogue names: {known or 'none'}"
                      f"{'; or a file of DITEPOSE_VIDEO_DIR' if settings.video_dir else ''})")


@dataclass(frozen=True)
class VideoPlan:
    """What every segment's worker and the merge need: stored as the job record's ``plan``."""

    model: ModelSpec
    served: bool
    video: str  # the file the workers read (an upload under jobs_dir, or a catalogue file)
    folder: str  # jobs_dir/videos/<job id>: segment and result files
    info: dict[str, Any]  # VideoInfo as a dict
    segments: list[list[int]]  # [run_start, start, end] per segment
    options: dict[str, Any]  # VideoJobOptions as a dict, server defaults filled in
    detector: str = "nanodet"
    det_score_thr: float | None = None
    detector_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), model=self.model.model_dump(mode="json"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoPlan:
        return cls(**dict(data, model=ModelSpec.model_validate(data["model"])))

    @property
    def video_info(self) -> VideoInfo:
        return VideoInfo(**self.info)

    def segment(self, index: int) -> SegmentPlan:
        return SegmentPlan(*self.segments[index])

    def video_options(self) -> VideoOptions:
        return runner_options(self.options)

    @property
    def frames_total(self) -> int:
        return int(self.info["frames"])


def runner_options(options: dict[str, Any]) -> VideoOptions:
    """The offline runner's options from a job's (:class:`VideoJobOptions` as a dict; None: the runner's default)."""
    return VideoOptions(detect_interval=int(options["detect_interval"]), flip_test=bool(options["flip_test"]),
                        score_threshold=float(options["score_threshold"]), smoothing=options["smoothing"],
                        max_persons=int(options["max_persons"] or VideoOptions.max_persons))


def plan_video_job(settings: Settings, model: ModelSpec, video: Path, folder: Path,
                   options: VideoJobOptions) -> VideoPlan:
    """Probe ``video`` (NotAVideo / NoDecodableFrames from the probe) and cut it into segments of about
    ``video_segment_s`` at keyframes, overlapping by ``video_overlap_frames`` (at least detect_interval)."""
    info = probe(video)
    index = read_index(video)
    opts = options.model_dump()
    video_options = runner_options(opts)
    segment_frames = max(1, round(settings.video_segment_s * info.fps)) if info.fps > 0 else len(index.pts)
    overlap = segment_overlap(video_options, settings.video_overlap_frames)
    plans = plan_segments(len(index.pts), index.keyframes, segment_frames, overlap)
    detector = job_detector_name(settings, options.detector)
    thr = settings.det_score_threshold if detector == "nanodet" else None
    return VideoPlan(model, True, str(video), str(folder), asdict(info),
                     [[p.run_start, p.start, p.end] for p in plans], opts, detector, thr,
                     detector_options(settings, detector, for_job=True))


def move_upload(upload: Path, folder: Path, suffix: str) -> Path:
    """The accepted upload, renamed into the job's folder (same file system: no copy)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"input{suffix}"
    os.replace(upload, target)
    return target


def sweep_expired(settings: Settings, store: JobStore, now: float | None = None) -> list[str]:
    """Delete the folders of video jobs that ended more than ``video_result_ttl_s`` ago, and uploads
    (``.part``) or folders without a record that old; returns the job ids swept."""
    root = videos_root(settings)
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    ttl = settings.video_result_ttl_s
    swept: list[str] = []
    for entry in root.iterdir():
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if entry.is_file():
            if entry.name.startswith(".upload-") and age > ttl:
                entry.unlink(missing_ok=True)
            continue
        rec = store.get(entry.name)
        if rec is None:
            expired = age > ttl
        else:
            expired = rec.state in TERMINAL and now - (rec.finished_at or rec.created_at) > ttl
        if expired:
            shutil.rmtree(entry, ignore_errors=True)
            swept.append(entry.name)
    if swept:
        log.info("swept %d expired video job folder(s)", len(swept))
    return swept
