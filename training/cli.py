"""Training sub-commands (train, evaluate, synth)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the training package's sub-commands to the ``ditepose`` parser."""
