"""One Euro filter (Casiez, Roussel & Vogel, CHI 2012) for keypoint jitter in video streams.

A low-pass filter whose cut-off rises with speed: still joints are smoothed hard (no
jitter), fast joints barely (little lag). One filter state per track id, driven by the
frames' timestamps, so dropped frames just mean a longer time step.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OneEuroConfig:
    min_cutoff: float = 1.0  # Hz, cut-off at rest
    beta: float = 0.05  # how fast the cut-off grows with speed
    d_cutoff: float = 1.0  # Hz, cut-off of the speed estimate

    def __post_init__(self) -> None:
        if self.min_cutoff <= 0 or self.d_cutoff <= 0:
            raise ValueError("min_cutoff and d_cutoff must be > 0")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """Filters an array signal (any shape) sample by sample."""

    def __init__(self, config: OneEuroConfig | None = None) -> None:
        self.config = config or OneEuroConfig()
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t: float | None = None

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self._x is None or self._t is None or self._dx is None:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), t
            return x.copy()
        if x.shape != self._x.shape:
            raise ValueError(f"signal shape changed from {self._x.shape} to {x.shape}")
        dt = t - self._t
        if dt <= 0:  # repeated or out-of-order timestamp: assume one 30 fps frame
            dt = 1.0 / 30.0
        cfg = self.config
        dx = (x - self._x) / dt
        dx_hat = self._dx + _alpha(cfg.d_cutoff, dt) * (dx - self._dx)
        cutoff = cfg.min_cutoff + cfg.beta * np.abs(dx_hat)
        x_hat = self._x + _alpha(cutoff, dt) * (x - self._x)
        self._x, self._dx, self._t = x_hat, dx_hat, t
        return x_hat.copy()


class KeypointSmoother:
    """One filter per track id on keypoint (x, y); scores pass through; ended tracks are forgotten."""

    def __init__(self, config: OneEuroConfig | None = None) -> None:
        self.config = config or OneEuroConfig()
        self.filters: dict[int, OneEuroFilter] = {}

    def smooth(self, track_id: int, keypoints: np.ndarray, t: float) -> np.ndarray:
        """Smoothed copy of ``keypoints`` [K, 3] of ``track_id`` at time ``t`` (seconds)."""
        filt = self.filters.get(track_id)
        if filt is None:
            filt = self.filters[track_id] = OneEuroFilter(self.config)
        out = np.array(keypoints, np.float64, copy=True)
        out[:, :2] = filt(out[:, :2], t)
        return out

    def retain(self, live_ids: set[int] | list[int]) -> None:
        """Drop the state of tracks that ended."""
        live = set(live_ids)
        for track_id in [k for k in self.filters if k not in live]:
            del self.filters[track_id]


# ---------------------------------------------------------------------------- offline (two-sided)
@dataclass(frozen=True)
class SavgolConfig:
    """Savitzky–Golay smoothing of a recorded track: a polynomial of ``order`` fitted over a window
    of ``window`` frames centred on each frame. Two-sided, so no lag (the One Euro filter above
    must lag: it sees only the past); for offline video, where the whole track is known."""

    window: int = 9  # frames, odd; 9 at 30 frames/s is 0.3 s
    order: int = 2

    def __post_init__(self) -> None:
        if self.window < 3 or self.window % 2 == 0:
            raise ValueError(f"window must be an odd number >= 3, got {self.window}")
        if not 0 <= self.order < self.window:
            raise ValueError(f"order must be in [0, window), got {self.order}")


def _runs(frames: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) row ranges of consecutive frame numbers."""
    breaks = np.flatnonzero(np.diff(frames) != 1) + 1
    bounds = [0, *breaks.tolist(), len(frames)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def savgol_keypoints(keypoints: np.ndarray, frames: np.ndarray | list[int],
                     config: SavgolConfig | None = None) -> np.ndarray:
    """Smoothed copy of one track's keypoints [F, K, 3] (x, y smoothed; scores pass through).

    Each run of consecutive ``frames`` is smoothed on its own (a gap is a missed detection, not
    a sample); a run shorter than the window gets the longest odd window it holds, and one too
    short for the polynomial is left as it is."""
    from scipy.signal import savgol_filter

    config = config or SavgolConfig()
    out = np.array(keypoints, np.float64, copy=True)
    for start, end in _runs(np.asarray(frames, np.int64)):
        length = end - start
        window = min(config.window, length if length % 2 else length - 1)
        if window <= config.order or window < 3:
            continue
        out[start:end, :, :2] = savgol_filter(out[start:end, :, :2], window, config.order, axis=0, mode="interp")
    return out


def one_euro_keypoints(keypoints: np.ndarray, timestamps: list[float],
                       config: OneEuroConfig | None = None) -> np.ndarray:
    """One track's keypoints [F, K, 3] through the causal One Euro filter, frame after frame."""
    smoother = KeypointSmoother(config)
    out = np.array(keypoints, np.float64, copy=True)
    for row, t in enumerate(timestamps):
        out[row] = smoother.smooth(0, out[row], float(t))
    return out
