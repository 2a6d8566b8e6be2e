"""``ditepose video IN --out tracks.json [--csv F] [--coco F] [--render out.mp4]``: video in, tracks out.

Two ways to run, one set of files out:

* locally (the default): the offline runner (:func:`~ditepose.service.video.offline.run_video`)
  decodes, detects, estimates and tracks in this process; no server, no Redis;
* ``--server URL``: the video is uploaded (streamed) to ``POST /v1/videos`` with the same
  options, the job is polled with a progress bar, and the files are downloaded from
  ``GET /v1/jobs/{id}/result`` (through :mod:`ditepose.client`). Ctrl-C cancels the job.

Either way the json/csv/coco files come from :mod:`ditepose.service.video.results`, the one writer
of those formats (the server writes them with it too), so both modes give the same files.

Exit codes: 0 done; 1 the job failed or the server could not be reached or answered 5xx;
2 bad input (a missing file, not a video, bad options, a 4xx from the server); 130 interrupted.
The progress bar goes to stderr (redrawn in place on a terminal, a line per 10% in a log);
stdout gets one summary line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ditepose.cli import whole_number
from ditepose.model.engines.setting import ENGINE_SETTINGS

if TYPE_CHECKING:
    from ditepose.client import DitePoseClient, Job, ResultFormat, VideoJobOptions
    from ditepose.service.video.offline import VideoOptions

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
SMOOTHING_CHOICES = ("none", "one_euro", "savgol")


class BadInput(Exception):
    """Input the command refuses before (or instead of) doing the work: exit 2 with this message."""


@dataclass(frozen=True)
class Outputs:
    """The files asked for; at least one."""

    json: Path | None
    csv: Path | None
    coco: Path | None
    render: Path | None

    def formats(self) -> list[tuple[ResultFormat, Path]]:
        """(result format, path) of every file asked for; the rendered video's format is mp4."""
        pairs: tuple[tuple[ResultFormat, Path | None], ...] = (("json", self.json), ("csv", self.csv), ("coco", self.coco), ("mp4", self.render))
        return [(fmt, path) for fmt, path in pairs if path is not None]


class ProgressBar:
    """A plain-text progress bar: redrawn in place on a terminal, one line per 10 % elsewhere."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.live = stream.isatty()
        self._last_decile = -1
        self._last_text = ""

    def update(self, done: int | None, total: int | None, state: str = "") -> None:
        fraction = min(max(done / total, 0.0), 1.0) if done is not None and total else 0.0
        filled = round(fraction * self.width)
        frames = f" {done}/{total} frames" if done is not None and total else ""
        text = f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * fraction:5.1f}%{frames} {state}".rstrip()
        if self.live:
            if text != self._last_text:
                self.stream.write("\r" + text.ljust(len(self._last_text)))
                self.stream.flush()
        elif int(fraction * 10) != self._last_decile or (state and state not in self._last_text):
            self._last_decile = int(fraction * 10)
            self.stream.write(text + "\n")
            self.stream.flush()
        self._last_text = text

    def close(self) -> None:
        """End the bar's line (on a terminal); a second call does nothing."""
        if self.live and self._last_text:
            self.stream.write("\n")
            self.stream.flush()
        self._last_text = ""


def register_video(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ditepose video`` to the ``ditepose`` parser."""
    video = subparsers.add_parser(
        "video", help="track the poses of everyone in a video file; write json/csv/coco and an annotated video",
        description="Pose tracks of a recorded video: locally (no server), or on a DitePose service with "
        "--server. Writes the same files either way (docs/video.md).")
    video.add_argument("video", metavar="VIDEO", help="the video file (MP4, MKV, WebM, AVI; H.264, H.265, VP9, MJPEG)")
    video.add_argument("--out", metavar="FILE", help="the tracks as JSON (one entry per person over time)")
    video.add_argument("--csv", metavar="FILE", help="the tracks as CSV: one row per (track, frame, joint)")
    video.add_argument("--coco", metavar="FILE", help="COCO keypoint results, image_id = frame index")
    video.add_argument("--render", metavar="VIDEO", help="the video with boxes, skeletons and track ids (.mp4)")
    video.add_argument("--server", metavar="URL", help="submit to this DitePose service (e.g. http://127.0.0.1:8000) "
                       "instead of running here")
    video.add_argument("--api-key", help="the server's X-API-Key (default: $DITEPOSE_API_KEY)")
    video.add_argument("--model", metavar="NAME", help="--server: the served model (default: the server's default)")
    video.add_argument("--checkpoint", metavar="PATH", help="local: the checkpoint to run (default: the shipped demo)")
    video.add_argument("--device", default="cpu", help="local: torch device (default %(default)s)")
    video.add_argument("--engine", default="auto", choices=ENGINE_SETTINGS,
                       help="local: auto (default): OpenVINO on a CPU where installed and agreeing with the torch "
                       "engine, else the torch engine; openvino (or an error); torch. The person detector follows")
    video.add_argument("--detector", help="person detector: nanodet (default), hog, whole, torchvision")
    video.add_argument("--detect-interval", type=whole_number(1), metavar="N",
                       help="run the detector on every N-th frame, carry the boxes between (default 5; 1 = every frame)")
    video.add_argument("--no-flip", action="store_true", help="skip the flip test (about 2x faster)")
    video.add_argument("--score-threshold", type=float, metavar="S",
                       help="keypoints scoring below S are marked not visible, never dropped (default 0.3)")
    video.add_argument("--smoothing", choices=SMOOTHING_CHOICES,
                       help="keypoint smoothing per track: savgol (two-sided, offline), one_euro (causal) or none "
                       "(default)")
    video.add_argument("--max-persons", type=whole_number(1), metavar="N", help="at most N persons per frame (default 20)")
    video.add_argument("--poll", type=float, default=0.5, metavar="S", help="--server: seconds between polls")
    video.set_defaults(func=run_video_command)


def run_video_command(args: argparse.Namespace) -> int:
    outputs = Outputs(*(Path(p) if p else None for p in (args.out, args.csv, args.coco, args.render)))
    try:
        _check_paths(Path(args.video), outputs)
        if args.server:
            return _run_remote(args, outputs)
        return _run_local(args, outputs)
    except BadInput as exc:
        print(f"ditepose video: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _check_paths(video: Path, outputs: Outputs) -> None:
    """Refuse at once what would otherwise fail after the work: no input, no output, no output folder."""
    if not video.is_file():
        raise BadInput(f"no such file: {video}")
    if not outputs.formats():
        raise BadInput("nothing to write: give --out, --csv, --coco and/or --render")
    for _, path in outputs.formats():
        if not path.parent.is_dir():
            raise BadInput(f"the folder of {path} does not exist")


# ---------------------------------------------------------------------------------------------- local
def _local_options(args: argparse.Namespace) -> VideoOptions:
    from ditepose.service.video.offline import VideoOptions

    given = {"detect_interval": args.detect_interval, "score_threshold": args.score_threshold,
             "smoothing": args.smoothing, "max_persons": args.max_persons}
    try:
        return VideoOptions(flip_test=not args.no_flip, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise BadInput(str(exc)) from exc


def _run_local(args: argparse.Namespace, outputs: Outputs) -> int:
    from ditepose.model.defaults import default_checkpoint_path
    from ditepose.model.detectors import build_detector
    from ditepose.service.video.decode import VideoError, probe
    from ditepose.service.video.offline import load_video_model, run_video
    from ditepose.service.video.render import render_video
    from ditepose.service.video.results import write_result

    if args.model:
        raise BadInput("--model names a served model (with --server); run a checkpoint here with --checkpoint")
    options = _local_options(args)
    try:
        info = probe(args.video)
    except VideoError as exc:
        raise BadInput(f"{args.video} is not a video this can read: {exc}") from exc
    checkpoint = args.checkpoint or default_checkpoint_path()
    if checkpoint is None:
        raise BadInput("no --checkpoint given and no shipped demo checkpoint in this installation")
    # first: a bad name fails before the model loads; NanoDet runs on the engine the pose network runs on
    detector_kw = {"engine": args.engine} if (args.detector or "nanodet").lower() == "nanodet" else {}
    detector = build_detector(args.detector or "nanodet", **detector_kw)
    model = load_video_model(checkpoint, device=args.device, engine=args.engine)
    bar = ProgressBar(sys.stderr)
    started = time.perf_counter()
    try:
        result = run_video(args.video, model, detector, options,
                           on_frame=lambda index: bar.update(index + 1, info.frames, "running"))
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    for fmt, path in outputs.formats():
        if fmt == "mp4":
            render_video(args.video, result, model.spec, path)
        else:
            write_result(result, path, fmt)
    ids = ", ".join(str(t.track_id) for t in result.tracks)
    print(f"{info.frames} frames in {seconds:.1f} s ({info.frames / max(seconds, 1e-9):.1f} frames/s), "
          f"{len(result.tracks)} tracks ({ids}); wrote {', '.join(str(p) for _, p in outputs.formats())}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- remote
def _remote_options(args: argparse.Namespace, outputs: Outputs) -> VideoJobOptions:
    from ditepose.client import VideoJobOptions

    if args.checkpoint:
        raise BadInput("--checkpoint is for local runs; the server serves its own models: name one with --model")
    return VideoJobOptions(model=args.model, detector=args.detector, detect_interval=args.detect_interval,
                           flip_test=False if args.no_flip else None, score_threshold=args.score_threshold,
                           smoothing=args.smoothing, render=True if outputs.render else None,
                           max_persons=args.max_persons)


def _run_remote(args: argparse.Namespace, outputs: Outputs) -> int:
    from ditepose.client import ApiError, DitePoseClient

    options = _remote_options(args, outputs)
    api_key = args.api_key or os.environ.get("DITEPOSE_API_KEY")
    with DitePoseClient(args.server, api_key=api_key) as api:
        try:
            accepted = api.submit_video(args.video, options)
            print(f"ditepose video: job {accepted.id} accepted", file=sys.stderr)
            job = _wait_with_bar(api, accepted.id, args.poll)
            if job is None:
                return EXIT_INTERRUPTED
            if job.state != "succeeded":
                print(f"ditepose video: job {job.id} {job.state}: {job.error or 'no error given'}", file=sys.stderr)
                return EXIT_FAILED
            for fmt, path in outputs.formats():
                api.download_result(job.id, fmt, path)
        except ApiError as exc:
            bad_input = 400 <= exc.status < 500
            print(f"ditepose video: {'the server refused it' if bad_input else 'server error'}: "
                  f"{exc.code}: {exc.message}", file=sys.stderr)
            return EXIT_BAD_INPUT if bad_input else EXIT_FAILED
    print(f"job {job.id}: {job.frames_total} frames; wrote {', '.join(str(p) for _, p in outputs.formats())}")
    return EXIT_OK


def _wait_with_bar(api: DitePoseClient, job_id: str, poll_s: float) -> Job | None:
    """The finished job, or None when Ctrl-C cancelled it (the job is cancelled on the server too)."""
    from ditepose.client import ApiError

    bar = ProgressBar(sys.stderr)
    try:
        return api.wait(job_id, on_progress=lambda j: bar.update(j.frames_done, j.frames_total, j.state),
                        poll_s=poll_s)
    except KeyboardInterrupt:
        bar.close()
        try:
            api.cancel(job_id)
            print(f"ditepose video: interrupted; job {job_id} cancelled", file=sys.stderr)
        except ApiError as exc:  # it finished meanwhile (job_finished), or the server is gone
            print(f"ditepose video: interrupted; job {job_id} not cancelled: {exc}", file=sys.stderr)
        return None
    finally:
        bar.close()
