"""One Euro filter (Casiez, Roussel & Vogel, CHI 2012) for keypoint jitter in video streams.

A low-pass filter whose cut-off rises with speed: still joints are smoothed hard (no
jitter), fast joints barely (little lag). One filter state per track id, driven by the
frames' timestamps, so dropped frames just mean a longer time step.
"""

from __future__ import annotations

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
