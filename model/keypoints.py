"""Dataset keypoint metadata as data: joint names, flip pairs, skeleton, OKS sigmas.

Everything that needs to know "which joint is the left wrist" reads it from a
:class:`KeypointSpec` instead of scattering literals through the code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KeypointSpec:
    """Metadata of one keypoint layout (e.g. COCO's 17 joints)."""

    name: str
    joint_names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...]
    upper_body_ids: tuple[int, ...]
    lower_body_ids: tuple[int, ...]
    joint_weights: tuple[float, ...]

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    def flip_index(self) -> list[int]:
        """Channel permutation that swaps left and right joints."""
        index = list(range(self.num_joints))
        for a, b in self.flip_pairs:
            index[a], index[b] = b, a
        return index

    def sigmas_array(self) -> np.ndarray:
        return np.asarray(self.sigmas, dtype=np.float64)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "joint_names": list(self.joint_names),
            "flip_pairs": [list(p) for p in self.flip_pairs],
            "skeleton": [list(e) for e in self.skeleton],
            "sigmas": list(self.sigmas),
        }


COCO = KeypointSpec(
    name="coco",
    joint_names=(
        "nose", "left_eye", "right_eye", "left_ear", "right_ear",
        "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
        "left_wrist", "right_wrist", "left_hip", "right_hip",
        "left_knee", "right_knee", "left_ankle", "right_ankle",
    ),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    skeleton=(
        (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
        (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
    ),
    sigmas=(
        0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
        0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
    ),
    upper_body_ids=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
    lower_body_ids=(11, 12, 13, 14, 15, 16),
    joint_weights=(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5),
)

MPII = KeypointSpec(
    name="mpii",
    joint_names=(
        "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
        "pelvis", "thorax", "upper_neck", "head_top",
        "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
    ),
    flip_pairs=((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)),
    skeleton=(
        (0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9),
        (8, 12), (12, 11), (11, 10), (8, 13), (13, 14), (14, 15),
    ),
    sigmas=(
        0.089, 0.083, 0.107, 0.107, 0.083, 0.089, 0.026, 0.026, 0.026, 0.026,
        0.062, 0.072, 0.179, 0.179, 0.072, 0.062,
    ),
    upper_body_ids=(7, 8, 9, 10, 11, 12, 13, 14, 15),
    lower_body_ids=(0, 1, 2, 3, 4, 5, 6),
    joint_weights=(1.5, 1.2, 1.0, 1.0, 1.2, 1.5, 1.0, 1.0, 1.0, 1.0, 1.5, 1.2, 1.0, 1.0, 1.2, 1.5),
)

KEYPOINT_SPECS: dict[str, KeypointSpec] = {spec.name: spec for spec in (COCO, MPII)}


def get_keypoint_spec(name: str) -> KeypointSpec:
    """Look a layout up by name ('coco' or 'mpii'); raises KeyError naming the choices."""
    try:
        return KEYPOINT_SPECS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown keypoint layout {name!r}; known: {sorted(KEYPOINT_SPECS)}") from None


def spec_for_num_joints(num_joints: int) -> KeypointSpec:
    """The layout a head with this many joints predicts (17 -> COCO, 16 -> MPII)."""
    for spec in KEYPOINT_SPECS.values():
        if spec.num_joints == num_joints:
            return spec
    raise KeyError(f"no keypoint layout with {num_joints} joints; known: {sorted(KEYPOINT_SPECS)}")


def spec_for_checkpoint(dataset: str, num_joints: int) -> KeypointSpec:
    """A checkpoint's layout: by its dataset name, else by its head's joint count (the authors'
    checkpoints may name a dataset this project has no layout for)."""
    try:
        return get_keypoint_spec(dataset)
    except KeyError:
        return spec_for_num_joints(num_joints)
