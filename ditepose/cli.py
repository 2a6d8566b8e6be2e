"""The ``ditepose`` command: one parser, sub-commands registered by each package.

Each package owns its commands in its own ``cli.py`` (``register(subparsers)``) and
imports heavy modules only inside the command function, so ``ditepose --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def parse_size(text: str) -> tuple[int, int]:
    """The sub-commands' ``--input`` type: ``'256x192'`` (HxW, as the paper writes sizes) -> ``(W, H)``.

    The order flips on purpose: the text follows the paper, the tuple follows OpenCV/PIL
    (width first). Anything but two integers joined by ``x`` (case-insensitive) is an
    ``argparse.ArgumentTypeError``, so argparse reports it as a usage error.
    """
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 256x192 (HxW), got {text!r}") from None
    return width, height


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum``, else a usage error naming the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"whole number >= {minimum}"  # what argparse names in 'invalid ... value'
    return parse


def build_parser() -> argparse.ArgumentParser:
    from ditepose.model import cli as model_cli
    from ditepose.service import cli as service_commands
    from ditepose.training import cli as training_cli

    parser = argparse.ArgumentParser(prog="ditepose", description="Dite-HRNet pose estimation service")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_cli.register(subparsers)
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
