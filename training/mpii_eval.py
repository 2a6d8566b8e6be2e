"""MPII PCKh exactly as mmpose 0.16 ``TopDownMpiiDataset.evaluate`` computes it.

The official ground truth is ``mpii_gt_val.mat`` (read with ``scipy.io.loadmat``):
``dataset_joints`` (a 1x16 cell of joint codes), ``jnt_missing`` [16, N], ``pos_gt_src``
[16, 2, N] (1-based MATLAB pixels) and ``headboxes_src`` [2, 2, N]. The same arrays may come
from a .json/.npz (:func:`save_mpii_gt`, what ``ditepose synth`` writes); every format goes
through :func:`load_mpii_gt` into the one scorer, :func:`evaluate_mpii`, which is the
arithmetic of mmpose 0.16 ``TopDownMpiiDataset.evaluate``: predictions +1 (1-based), head size =
0.6 x the headbox diagonal, errors over visible joints (``1 - jnt_missing``), pelvis and thorax
(rows 6 and 7) masked out of the count-weighted mean.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

SC_BIAS = 0.6
THRESHOLD = 0.5
MPII_JOINT_CODES: tuple[str, ...] = (
    "rank", "rkne", "rhip", "lhip", "lkne", "lank", "pelv", "thor",
    "neck", "head", "rwri", "relb", "rsho", "lsho", "lelb", "lwri",
)
_GT_KEYS = ("dataset_joints", "jnt_missing", "pos_gt_src", "headboxes_src")


def _names(raw: Any) -> list[str]:
    """Joint names from a list, a numpy string array or a .mat cell array."""
    flat = np.asarray(raw, dtype=object).reshape(-1)
    out = []
    for item in flat:
        while isinstance(item, np.ndarray):
            item = item.reshape(-1)[0]
        out.append(str(item))
    return out


def load_mpii_gt(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read the ground truth from a mapping, .json, .npz or (with scipy) .mat file."""
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"MPII ground-truth file not found: {path}")
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                raw = {k: data[k] for k in data.files}
        elif path.suffix == ".mat":
            from scipy.io import loadmat  # imported here: scipy costs a few hundred ms to import
            from scipy.io.matlab import MatReadError

            try:
                raw = loadmat(str(path))
            except (MatReadError, ValueError, TypeError, OSError) as exc:  # scipy's errors for a file that is not a .mat
                raise ValueError(f"{path}: not a readable MATLAB .mat file ({exc})") from exc
        else:
            raise ValueError(f"unsupported MPII ground-truth format: {path.suffix} (want .json/.npz/.mat)")
    missing = [k for k in _GT_KEYS if k not in raw]
    if missing:
        raise ValueError(f"MPII ground truth lacks {missing}")
    gt: dict[str, Any] = {
        "dataset_joints": _names(raw["dataset_joints"]),
        "jnt_missing": np.asarray(raw["jnt_missing"], dtype=np.float64),
        "pos_gt_src": np.asarray(raw["pos_gt_src"], dtype=np.float64),
        "headboxes_src": np.asarray(raw["headboxes_src"], dtype=np.float64),
    }
    n = gt["pos_gt_src"].shape[-1]
    if (gt["pos_gt_src"].shape != (16, 2, n) or gt["jnt_missing"].shape != (16, n)
            or gt["headboxes_src"].shape != (2, 2, n)):
        raise ValueError("MPII ground truth shapes must be pos_gt_src [16,2,N], jnt_missing [16,N], "
                         f"headboxes_src [2,2,N]; got {gt['pos_gt_src'].shape}, {gt['jnt_missing'].shape}, "
                         f"{gt['headboxes_src'].shape}")
    unknown = sorted(set(MPII_JOINT_CODES) - set(gt["dataset_joints"]))
    if len(gt["dataset_joints"]) != 16 or unknown:
        raise ValueError(f"MPII ground truth dataset_joints must name the 16 MPII joints; lacks {unknown}")
    return gt


def save_mpii_gt(path: str | Path, joints0: np.ndarray, visible: np.ndarray, headboxes: np.ndarray) -> None:
    """Write ground truth in the mat layout as JSON: joints0 [N,16,2] 0-based, headboxes [N,2,2]."""
    joints0 = np.asarray(joints0, dtype=np.float64)
    data = {
        "dataset_joints": list(MPII_JOINT_CODES),
        "jnt_missing": (1 - np.asarray(visible, dtype=np.float64)).T.tolist(),
        "pos_gt_src": np.transpose(joints0 + 1.0, (1, 2, 0)).tolist(),
        "headboxes_src": np.transpose(np.asarray(headboxes, dtype=np.float64), (1, 2, 0)).tolist(),
    }
    Path(path).write_text(json.dumps(data))


def evaluate_mpii(preds: np.ndarray, gt: str | Path | Mapping[str, Any]) -> dict[str, float]:
    """PCKh table for ``preds`` [N, 16, >=2] (0-based pixel coords, ordered as the gt people)."""
    preds = np.asarray(preds, dtype=np.float64)
    if preds.ndim != 3 or preds.shape[1] != 16 or preds.shape[2] < 2:
        raise ValueError(f"preds must be [N, 16, 2], got {preds.shape}")
    g = load_mpii_gt(gt)
    if preds.shape[0] != g["pos_gt_src"].shape[-1]:
        raise ValueError(f"{preds.shape[0]} predictions for {g['pos_gt_src'].shape[-1]} ground-truth people")
    preds = preds[..., :2] + 1.0  # mmpose: 0-based -> 1-based
    names = np.asarray(g["dataset_joints"])

    def idx(code: str) -> int:
        return int(np.where(names == code)[0][0])

    jnt_visible = 1 - g["jnt_missing"]
    uv_err = np.linalg.norm(np.transpose(preds, [1, 2, 0]) - g["pos_gt_src"], axis=1)
    headsizes = np.linalg.norm(g["headboxes_src"][1] - g["headboxes_src"][0], axis=0) * SC_BIAS
    scale = headsizes * np.ones((len(uv_err), 1), dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled_uv_err = (uv_err / scale) * jnt_visible
        jnt_count = np.sum(jnt_visible, axis=1)
        pckh = 100.0 * np.sum((scaled_uv_err <= THRESHOLD) * jnt_visible, axis=1) / jnt_count
        rng = np.arange(0, 0.5 + 0.01, 0.01)
        pck_all = np.zeros((len(rng), 16), dtype=np.float32)
        for r, thr in enumerate(rng):
            pck_all[r] = 100.0 * np.sum((scaled_uv_err <= thr) * jnt_visible, axis=1) / jnt_count
    pckh = np.ma.array(pckh, mask=False)
    pckh[6:8] = np.ma.masked  # pelvis and thorax are not scored (sets the mask only)
    jnt_count = np.ma.array(jnt_count, mask=False)
    jnt_count[6:8] = np.ma.masked
    jnt_ratio = jnt_count / np.sum(jnt_count).astype(np.float64)

    def pair(a: str, b: str) -> float:
        return float(0.5 * (pckh[idx(a)] + pckh[idx(b)]))

    return {
        "Head": float(pckh[idx("head")]),
        "Shoulder": pair("lsho", "rsho"),
        "Elbow": pair("lelb", "relb"),
        "Wrist": pair("lwri", "rwri"),
        "Hip": pair("lhip", "rhip"),
        "Knee": pair("lkne", "rkne"),
        "Ankle": pair("lank", "rank"),
        "PCKh": float(np.sum(pckh * jnt_ratio)),
        # mmpose reads row 11 of the 0.00..0.50 sweep (threshold 0.11) and calls it PCKh@0.1.
        "PCKh@0.1": float(np.sum(pck_all[11, :] * jnt_ratio)),
    }
