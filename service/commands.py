"""Service-side sub-commands (serve, worker, stream). Filled in by the service issues."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the service's sub-commands to the ``ditepose`` parser."""
    from service.jobs.cli import add_worker_command

    add_worker_command(subparsers)
