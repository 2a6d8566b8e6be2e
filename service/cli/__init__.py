"""Service-side sub-commands (serve, worker, stream, video)."""

from __future__ import annotations

import argparse

from ditepose.cli import whole_number
from ditepose.service.cli.video import register_video


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the service's sub-commands to the ``ditepose`` parser."""
    from ditepose.service.jobs.cli import add_worker_command

    add_worker_command(subparsers)
    serve = subparsers.add_parser(
        "serve",
        help="run the REST (and gRPC) pose service",
        description="Serve pose estimation over HTTP (and gRPC). Every DITEPOSE_* setting applies; "
        "flags override them.",
    )
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, help="REST port (default 8000)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 50051)")
    serve.add_argument("--no-grpc", action="store_true", help="do not start gRPC")
    serve.add_argument("--workers-per-device", type=int, help="inference threads per device (default 1)")
    serve.add_argument("--devices", help="'auto', 'cpu' or e.g. 'cuda:0,cuda:1'")
    serve.add_argument("--api-processes", type=whole_number(1), metavar="N",
                       help="API processes sharing the ports, fed by this process as the inference host "
                       "(default 1: one process does everything)")
    serve.add_argument(
        "--model",
        action="append",
        metavar="NAME=CHECKPOINT[:ARCH]",
        help="serve this checkpoint under NAME (repeatable; replaces the default model)",
    )
    serve.set_defaults(func=_serve)
    register_stream(subparsers)
    register_video(subparsers)


def parse_model_arg(text: str) -> dict:
    """``name=path[:arch]`` -> ModelSpec fields."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--model wants NAME=CHECKPOINT[:ARCH], got {text!r}")
    path, _, arch = rest.rpartition(":") if rest.rsplit(":", 1)[-1].startswith("dite_") else (rest, "", "")
    spec = {"name": name, "checkpoint": path}
    if arch:
        spec["arch"] = arch
    return spec


def _serve(args: argparse.Namespace) -> int:
    import logging

    from ditepose.service.core.settings import Settings
    from ditepose.service.server import run_servers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict = {}
    for flag, field in (
        ("host", "host"),
        ("port", "port"),
        ("grpc_port", "grpc_port"),
        ("workers_per_device", "workers_per_device"),
        ("devices", "devices"),
        ("api_processes", "api_processes"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[field] = value
    if args.no_grpc:
        overrides["grpc_enabled"] = False
    if args.model:
        overrides["models"] = [parse_model_arg(m) for m in args.model]
    run_servers(Settings(**overrides))
    return 0


def register_stream(subparsers: argparse._SubParsersAction) -> None:
    """``ditepose stream``: the gRPC streaming client (service/cli/stream_client.py)."""
    stream = subparsers.add_parser(
        "stream",
        help="stream a video or image folder to a gRPC server; write annotated video / JSON lines",
        description="Send every frame of VIDEO (or every image of a folder, in name order) to StreamPose "
        "and write the results in order.",
    )
    stream.add_argument("source", metavar="VIDEO_OR_DIR", help="video file (anything OpenCV reads) or image folder")
    stream.add_argument("--target", default="127.0.0.1:50051", help="gRPC server host:port (default %(default)s)")
    stream.add_argument("--out", metavar="VIDEO", help="write the annotated frames to this video (.mp4)")
    stream.add_argument("--jsonl", metavar="FILE", help="write one JSON line per answered frame")
    stream.add_argument("--policy", choices=("queue", "drop-oldest"), default="queue",
                        help="when frames come faster than served: wait (queue) or drop the oldest waiting")
    stream.add_argument("--max-in-flight", type=int, default=4, help="frames the server works on at once")
    stream.add_argument("--max-queued", type=int, default=1, help="frames waiting beyond those (drop-oldest)")
    stream.add_argument("--model", default="", help="served model name (default: the server's default)")
    stream.add_argument("--no-flip", action="store_true", help="skip the flip test (about 2x faster)")
    stream.add_argument("--no-track", action="store_true", help="no track ids")
    stream.add_argument("--smooth", action="store_true", help="One Euro smoothing of keypoints per track")
    stream.add_argument("--detect-interval", type=whole_number(0), default=0, metavar="N",
                        help="run the person detector on every N-th frame and carry the boxes from the poses "
                        "in between (0 = the server's default, 5; 1 = every frame)")
    stream.add_argument("--fps", type=float, help="frame rate for timestamps (default: the video's, 30 for folders)")
    stream.add_argument("--realtime", action="store_true", help="send frames at --fps like a live camera")
    stream.add_argument("--limit", type=int, help="send at most this many frames")
    stream.add_argument("--api-key", help="x-api-key metadata (default: $DITEPOSE_API_KEY)")
    stream.set_defaults(func=_stream)




def _stream(args: argparse.Namespace) -> int:
    import os
    import sys
    from pathlib import Path

    import grpc

    from ditepose.service.cli.stream_client import run_stream

    if not args.out and not args.jsonl:
        print("ditepose stream: note: neither --out nor --jsonl given; only a summary is printed", file=sys.stderr)
    try:
        summary = run_stream(
            Path(args.source),
            args.target,
            out_video=Path(args.out) if args.out else None,
            jsonl=Path(args.jsonl) if args.jsonl else None,
            policy=args.policy,
            max_in_flight=args.max_in_flight,
            max_queued=args.max_queued,
            model=args.model,
            flip_test=not args.no_flip,
            tracking=not args.no_track,
            smoothing=args.smooth,
            detect_interval=args.detect_interval,
            fps=args.fps,
            pace=args.realtime,
            limit=args.limit,
            api_key=args.api_key or os.environ.get("DITEPOSE_API_KEY"),
        )
    except grpc.RpcError as exc:
        print(f"ditepose stream: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0
