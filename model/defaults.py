"""Where the project's shipped default checkpoint lives."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_CHECKPOINT_NAME = "dite_hrnet_18_coco_demo.pth"


def default_checkpoint_path() -> Path | None:
    """The shipped demo checkpoint, or None when this checkout has none."""
    path = WEIGHTS_DIR / DEFAULT_CHECKPOINT_NAME
    return path if path.is_file() else None
