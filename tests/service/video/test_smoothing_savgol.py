"""Two-sided Savitzky–Golay smoothing of recorded tracks, and the One Euro filter over a whole track."""

from __future__ import annotations

import numpy as np
import pytest

from ditepose.service.video.smoothing import OneEuroConfig, SavgolConfig, one_euro_keypoints, savgol_keypoints


def quadratic_track(frames: list[int], joints: int = 17) -> np.ndarray:
    t = np.asarray(frames, np.float64)
    kpts = np.zeros((len(frames), joints, 3))
    kpts[:, :, 0] = (100 + 3 * t + 0.2 * t**2)[:, None]
    kpts[:, :, 1] = (50 - 1.5 * t)[:, None]
    kpts[:, :, 2] = 0.7
    return kpts


def test_a_quadratic_motion_passes_unchanged_without_lag() -> None:
    frames = list(range(40))
    kpts = quadratic_track(frames)
    np.testing.assert_allclose(savgol_keypoints(kpts, frames, SavgolConfig(9, 2)), kpts, atol=1e-9)


def test_jitter_is_reduced_and_scores_kept() -> None:
    rng = np.random.default_rng(0)
    frames = list(range(60))
    clean = quadratic_track(frames)
    noisy = clean.copy()
    noisy[:, :, :2] += rng.normal(0, 3.0, noisy[:, :, :2].shape)
    smooth = savgol_keypoints(noisy, frames)
    assert np.abs(smooth[..., :2] - clean[..., :2]).mean() < 0.6 * np.abs(noisy[..., :2] - clean[..., :2]).mean()
    np.testing.assert_array_equal(smooth[..., 2], noisy[..., 2])


def test_runs_split_at_gaps_and_short_runs_are_left_alone() -> None:
    frames = [0, 1, 2, 3, 4, 5, 6, 20, 21, 40]  # a run of 7, a run of 2, a single frame
    kpts = quadratic_track(frames)
    kpts[7:, :, :2] += 500.0  # after the gap the person is elsewhere: no smoothing across it
    out = savgol_keypoints(kpts, frames, SavgolConfig(9, 2))
    np.testing.assert_allclose(out, kpts, atol=1e-9)  # quadratic within the first run; others untouched


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="odd"):
        SavgolConfig(window=8)
    with pytest.raises(ValueError, match="order"):
        SavgolConfig(window=5, order=5)


def test_one_euro_over_a_track_lags_a_step() -> None:
    frames = list(range(30))
    kpts = np.zeros((30, 2, 3))
    kpts[15:, :, 0] = 10.0
    out = one_euro_keypoints(kpts, [f / 30 for f in frames], OneEuroConfig(min_cutoff=1.0, beta=0.0))
    assert out[15, 0, 0] < 10.0 and out[29, 0, 0] > out[15, 0, 0]  # causal: follows the step slowly
    np.testing.assert_array_equal(out[:15], kpts[:15])
