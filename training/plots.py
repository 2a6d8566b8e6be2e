"""PNG plots for people: training curves from the metrics log, per-joint accuracy, OKS histogram.

matplotlib draws on its Agg canvas (no display, no pyplot state) and is imported inside the
plotting functions, so importing this module stays cheap. Every ``plot_*`` function writes one PNG
and returns its path.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ditepose.model.draw import JOINT_COLORS, joint_side

Row = dict[str, Any]

# Column spellings seen in metrics logs -> the names used here.
_ALIASES = {
    "epoch": "epoch", "ep": "epoch",
    "iter": "iter", "iters": "iter", "iteration": "iter", "step": "iter", "global_iter": "iter",
    "global_step": "iter",
    "loss": "loss", "train_loss": "loss", "loss_total": "loss", "total_loss": "loss",
    "ap": "AP", "coco_ap": "AP", "val_ap": "AP", "ap50": "AP50", "ap75": "AP75", "ar": "AR",
    "pckh": "PCKh", "val_pckh": "PCKh", "pckh@0.1": "PCKh@0.1", "pckh@0.5": "PCKh",
    "kind": "kind", "phase": "kind", "split": "kind",
}
METRIC_COLUMNS = ("AP", "AP50", "AP75", "AR", "PCKh", "PCKh@0.1")


def _canonical(key: str) -> str:
    return _ALIASES.get(key.strip().lower(), key.strip())


def _value(raw: Any) -> Any:
    """Numbers from CSV text; blanks and NaN-like text vanish (None)."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, int | float):
        return float(raw) if math.isfinite(raw) else None
    text = str(raw).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else None


def _normalise(row: Mapping[str, Any]) -> Row:
    out: Row = {}
    for key, raw in row.items():
        if key is None:
            continue
        value = _value(raw)
        if value is not None:
            out[_canonical(str(key))] = value
    return out


def read_metrics_log(path: str | Path) -> list[Row]:
    """Rows of a metrics log: ``metrics.jsonl`` / ``metrics.csv`` or a work dir holding one.

    Tolerant by design: column names are matched case-insensitively with common aliases
    (``step`` -> ``iter``, ``train_loss`` -> ``loss``, ``pckh`` -> ``PCKh``), blank cells and
    a torn last JSON line (a run still writing) are skipped.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("metrics.jsonl", "metrics.json", "metrics.csv", "log.jsonl", "log.csv"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"no metrics.jsonl or metrics.csv in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"metrics log not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    rows: list[Row] = []
    if path.suffix.lower() == ".csv":
        for raw in csv.DictReader(text.splitlines()):
            row = _normalise(raw)
            if row:
                rows.append(row)
        return rows
    stripped = text.strip()
    if stripped.startswith("["):  # one JSON array instead of JSON lines
        records: Iterable[Any] = json.loads(stripped)
    else:
        records = []
        for line in stripped.splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    for record in records:
        if isinstance(record, Mapping):
            row = _normalise(record)
            if row:
                rows.append(row)
    return rows


def _axis(rows: Sequence[Row], prefer: Sequence[str]) -> tuple[str, list[float]]:
    for key in prefer:
        if rows and all(isinstance(r.get(key), float) for r in rows):
            return key, [r[key] for r in rows]
    return "row", [float(i) for i in range(len(rows))]


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    """A Figure on the Agg canvas without pyplot: no global state, safe in threads and servers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_loss(rows: Sequence[Row], path: str | Path, smooth: int = 0) -> Path:
    """Training loss against iterations (or epochs); ``smooth`` > 1 adds a moving average."""
    train = [r for r in rows if isinstance(r.get("loss"), float) and r.get("kind", "train") != "eval"]
    if not train:
        raise ValueError("the metrics log has no 'loss' values")
    xname, xs = _axis(train, ("iter", "epoch"))
    losses = np.array([r["loss"] for r in train])
    fig, ax = _figure()
    ax.plot(xs, losses, color="#4a7bd0", alpha=0.45 if smooth > 1 else 1.0, label="loss")
    if smooth > 1 and len(losses) >= smooth:
        kernel = np.ones(smooth) / smooth
        ax.plot(xs[smooth - 1:], np.convolve(losses, kernel, mode="valid"), color="#1d3f8a",
                label=f"moving average ({smooth})")
    ax.set_xlabel("iteration" if xname == "iter" else xname)
    ax.set_ylabel("loss")
    if losses.min() > 0 and losses.max() / losses.min() > 50:
        ax.set_yscale("log")
    ax.set_title("Training loss")
    ax.legend()
    return _save(fig, path)


def plot_metric_curves(rows: Sequence[Row], path: str | Path, metrics: Sequence[str] = METRIC_COLUMNS) -> Path:
    """Validation AP / PCKh (whichever the log has) against epochs (or iterations)."""
    def has(row: Row, name: str) -> bool:
        # pycocotools writes -1 for "undefined" (no ground truth in that area range): not a point.
        return isinstance(row.get(name), float) and row[name] >= 0

    present = [m for m in metrics if any(has(r, m) for r in rows)]
    if not present:
        raise ValueError(f"the metrics log has none of {list(metrics)}")
    fig, ax = _figure()
    for name in present:
        evals = [r for r in rows if has(r, name)]
        xname, xs = _axis(evals, ("epoch", "iter"))
        ys = [r[name] for r in evals]
        ax.plot(xs, ys, marker="o", label=name)
        best = int(np.argmax(ys))
        ax.annotate(f"{ys[best]:.3g}", (xs[best], ys[best]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
        ax.set_xlabel("epoch" if xname == "epoch" else "iteration" if xname == "iter" else xname)
    ax.set_ylabel("AP (0..1)" if all(m.startswith("A") for m in present) else "metric")
    ax.set_title("Validation " + ", ".join(present))
    ax.legend()
    return _save(fig, path)


def plot_training_curves(log: str | Path | Sequence[Row], out_dir: str | Path, smooth: int = 0) -> list[Path]:
    """``loss.png`` and ``metrics.png`` in ``out_dir`` from a metrics log (path, work dir or rows).

    Writes what the log supports; raises ValueError when it has neither loss nor metrics.
    """
    rows = read_metrics_log(log) if isinstance(log, str | Path) else list(log)
    out = Path(out_dir)
    written: list[Path] = []
    if any(isinstance(r.get("loss"), float) for r in rows):
        written.append(plot_loss(rows, out / "loss.png", smooth))
    if any(isinstance(r.get(m), float) for r in rows for m in METRIC_COLUMNS):
        written.append(plot_metric_curves(rows, out / "metrics.png"))
    if not written:
        raise ValueError(f"nothing to plot: the log has no loss and none of {list(METRIC_COLUMNS)}")
    return written


def _bar_color(name: str) -> str:
    side = joint_side(name.lower())
    if side == "center":
        return "#4a7bd0"
    r, g, b = JOINT_COLORS[side]
    return f"#{r:02x}{g:02x}{b:02x}"


def plot_per_joint(
    metrics_per_joint: Mapping[str, float] | Sequence[tuple[str, float]],
    path: str | Path,
    title: str = "Per-joint accuracy",
    xlabel: str | None = None,
) -> Path:
    """Horizontal bars, one per joint (or joint group), left joints warm and right ones cool.

    Values in 0..1 are shown as fractions, larger ones as percent (MPII's PCKh table).
    """
    items = list(metrics_per_joint.items() if isinstance(metrics_per_joint, Mapping) else metrics_per_joint)
    if not items:
        raise ValueError("no per-joint values to plot")
    names = [str(n) for n, _ in items]
    values = np.array([float(v) for _, v in items], dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"per-joint values must be finite: {dict(zip(names, values.tolist(), strict=True))}")
    percent = values.max() > 1.0
    fig, ax = _figure(7.0, max(2.5, 0.32 * len(items) + 1.2))
    ypos = np.arange(len(items))
    ax.barh(ypos, values, color=[_bar_color(n) for n in names])
    ax.set_yticks(ypos, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 100 if percent else 1)
    for y, v in zip(ypos, values, strict=True):
        ax.text(v, y, f" {v:.1f}" if percent else f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlabel(xlabel or ("percent" if percent else "fraction"))
    ax.set_title(title)
    return _save(fig, path)


def plot_oks_histogram(oks_values: Sequence[float] | np.ndarray, path: str | Path, bins: int = 20) -> Path:
    """Histogram of per-person OKS in [0, 1] with the AP50/AP75 thresholds marked."""
    values = np.asarray(oks_values, dtype=np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError("no finite OKS values to plot")
    if (finite < -1e-9).any() or (finite > 1 + 1e-9).any():
        raise ValueError(f"OKS values must lie in [0, 1]; got min {finite.min():.3g}, max {finite.max():.3g}")
    fig, ax = _figure()
    ax.hist(np.clip(finite, 0, 1), bins=bins, range=(0, 1), color="#4a7bd0", edgecolor="white")
    for thr, label in ((0.5, "OKS 0.5 (AP50)"), (0.75, "OKS 0.75 (AP75)")):
        share = float((finite >= thr).mean())
        ax.axvline(thr, color="#c0392b" if thr == 0.5 else "#e67e22", linestyle="--",
                   label=f"{label}: {100 * share:.0f}% above")
    ax.set_xlim(0, 1)
    ax.set_xlabel("OKS")
    ax.set_ylabel("persons")
    dropped = values.size - finite.size
    extra = f", {dropped} non-finite left out" if dropped else ""
    ax.set_title(f"OKS of {finite.size} persons (mean {finite.mean():.3f}{extra})")
    ax.legend(loc="upper left")
    return _save(fig, path)
