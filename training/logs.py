"""Metrics log: CSV + JSON lines in the work dir, TensorBoard when it is importable."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Append-only rows; a resumed run appends to the same files."""

    CSV_FIELDS = ("kind", "epoch", "iter", "loss", "lr", "seconds", "AP", "AP50", "AR", "PCKh", "PCKh@0.1")

    def __init__(self, work_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.jsonl = open(work_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        csv_path = work_dir / "metrics.csv"
        new = not csv_path.exists()
        self.csv_file = open(csv_path, "a", newline="")  # noqa: SIM115
        self.csv = csv.DictWriter(self.csv_file, fieldnames=self.CSV_FIELDS, extrasaction="ignore")
        if new:
            self.csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(work_dir / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        self.csv.writerow(row)
        self.csv_file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and key not in ("epoch", "iter"):
                    self.tb.add_scalar(f"{row.get('kind', 'x')}/{key}", value, row.get("iter", 0))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.csv_file.close()
            if self.tb is not None:
                self.tb.close()


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over an epoch's steps (None without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled)
