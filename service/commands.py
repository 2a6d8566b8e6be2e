"""Service-side sub-commands (serve, worker, stream)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the service's sub-commands to the ``ditepose`` parser."""
    from service.jobs.cli import add_worker_command

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
    serve.add_argument(
        "--model",
        action="append",
        metavar="NAME=CHECKPOINT[:ARCH]",
        help="serve this checkpoint under NAME (repeatable; replaces the default model)",
    )
    serve.set_defaults(func=_serve)


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

    from service.server import run_servers
    from service.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict = {}
    for flag, field in (
        ("host", "host"),
        ("port", "port"),
        ("grpc_port", "grpc_port"),
        ("workers_per_device", "workers_per_device"),
        ("devices", "devices"),
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
