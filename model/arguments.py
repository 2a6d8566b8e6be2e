"""Argument types shared by every ``ditepose`` sub-command and by manifests that spell sizes the same way.

They live in ``model`` (the base layer) so that ``model``, ``training`` and ``service`` can all read
``'256x192'`` alike without importing the CLI root, which imports all of them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


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
