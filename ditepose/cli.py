"""The ``ditepose`` command: one parser, sub-commands registered by each package.

Each package owns its commands in its own ``cli.py`` (``register(subparsers)``) and
imports heavy modules only inside the command function, so ``ditepose --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ditepose.model.arguments import parse_size, whole_number

if TYPE_CHECKING:
    from ditepose.service.core.settings import DatasetSpec

__all__ = ["build_parser", "catalogue_dataset", "main", "parse_size", "whole_number"]


def catalogue_dataset(name: str) -> DatasetSpec:
    """A dataset of the service's evaluation catalogue (``DITEPOSE_DATASETS``, ``demo-synthetic``):
    what ``ditepose export --gate NAME`` names. Looked up here, where the CLI may know the service,
    so the gate (training) does not."""
    from ditepose.service.core.settings import Settings
    from ditepose.service.jobs.catalogue import Catalogue

    return Catalogue.from_settings(Settings()).dataset(name).spec


def build_parser() -> argparse.ArgumentParser:
    from ditepose.model import cli as model_cli
    from ditepose.service import cli as service_commands
    from ditepose.training import cli as training_cli
    from ditepose.training import gate_cli

    parser = argparse.ArgumentParser(prog="ditepose", description="Dite-HRNet pose estimation service")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_cli.register(subparsers)
    gate_cli.register(subparsers, find_dataset=catalogue_dataset)
    training_cli.register(subparsers)
    service_commands.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"ditepose {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
