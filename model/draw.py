"""Drawing poses on images: skeleton limbs coloured by body side and part, joints, boxes.

:func:`plan_drawing` returns exactly what :func:`draw_poses` will draw, so tests (and
callers that render elsewhere, e.g. a web canvas) can use the plan without pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from ditepose.model.keypoints import KeypointSpec

Color = tuple[int, int, int]  # RGB

# Left side warm, right side cool, centre neutral; arms, legs and head in different shades.
PALETTE: dict[tuple[str, str], Color] = {
    ("left", "arm"): (255, 128, 0),
    ("left", "leg"): (255, 51, 51),
    ("left", "head"): (255, 204, 51),
    ("right", "arm"): (0, 153, 255),
    ("right", "leg"): (51, 51, 255),
    ("right", "head"): (51, 255, 204),
    ("center", "torso"): (0, 230, 0),
    ("center", "head"): (230, 0, 230),
}
JOINT_COLORS: dict[str, Color] = {"left": (255, 160, 40), "right": (40, 160, 255), "center": (230, 230, 230)}
BOX_COLOR: Color = (255, 255, 255)

_PARTS = (
    ("head", ("nose", "eye", "ear", "head", "neck")),
    ("arm", ("shoulder", "elbow", "wrist")),
    ("leg", ("knee", "ankle")),
)


def joint_side(name: str) -> str:
    return "left" if name.startswith("left") else "right" if name.startswith("right") else "center"


def joint_part(name: str) -> str:
    for part, words in _PARTS:
        if any(w in name for w in words):
            return part
    return "torso"  # hips, pelvis, thorax


def limb_color(spec: KeypointSpec, a: int, b: int) -> Color:
    """Colour of the skeleton edge a-b: by side (both joints on one side) and part."""
    na, nb = spec.joint_names[a], spec.joint_names[b]
    side = joint_side(na) if joint_side(na) == joint_side(nb) else "center"
    parts = {joint_part(na), joint_part(nb)}
    part = "head" if "head" in parts else "arm" if "arm" in parts else "leg" if "leg" in parts else "torso"
    if side == "center":
        part = "head" if part == "head" else "torso"
    return PALETTE[(side, part)]


@dataclass(frozen=True)
class DrawnEdge:
    person: int
    joints: tuple[int, int]
    start: tuple[int, int]
    end: tuple[int, int]
    color: Color


@dataclass(frozen=True)
class DrawnJoint:
    person: int
    joint: int
    center: tuple[int, int]
    color: Color


@dataclass(frozen=True)
class DrawPlan:
    edges: list[DrawnEdge]
    joints: list[DrawnJoint]
    boxes: list[tuple[int, int, int, int]]  # x1, y1, x2, y2


def _keypoints_of(person: object) -> np.ndarray:
    kpts = getattr(person, "keypoints", person)
    return np.asarray(kpts, dtype=np.float64).reshape(-1, 3)


def plan_drawing(persons: Sequence[object], spec: KeypointSpec, score_thr: float = 0.3) -> DrawPlan:
    """What to draw: joints scored >= ``score_thr`` and the edges whose two joints are both shown."""
    edges: list[DrawnEdge] = []
    joints: list[DrawnJoint] = []
    boxes: list[tuple[int, int, int, int]] = []
    for p, person in enumerate(persons):
        kpts = _keypoints_of(person)
        if len(kpts) != spec.num_joints:
            raise ValueError(f"person {p} has {len(kpts)} keypoints; spec {spec.name!r} has {spec.num_joints}")
        shown = (kpts[:, 2] >= score_thr) & np.isfinite(kpts[:, :2]).all(1)
        pts = [(round(x), round(y)) if ok else (0, 0) for (x, y), ok in zip(kpts[:, :2].tolist(), shown, strict=True)]
        for a, b in spec.skeleton:
            if shown[a] and shown[b]:
                edges.append(DrawnEdge(p, (a, b), pts[a], pts[b], limb_color(spec, a, b)))
        for j in np.flatnonzero(shown).tolist():
            joints.append(DrawnJoint(p, j, pts[j], JOINT_COLORS[joint_side(spec.joint_names[j])]))
        bbox = getattr(person, "bbox_xywh", None)
        if bbox is not None:
            x, y, w, h = (float(v) for v in bbox)
            boxes.append((round(x), round(y), round(x + w), round(y + h)))
    return DrawPlan(edges, joints, boxes)


def draw_poses(
    image_rgb: np.ndarray,
    persons: Sequence[object],
    spec: KeypointSpec,
    score_thr: float = 0.3,
    draw_boxes: bool = True,
    thickness: int | None = None,
    radius: int | None = None,
) -> np.ndarray:
    """A copy of ``image_rgb`` with boxes, limbs and joints drawn (line width scales with the image)."""
    img = np.ascontiguousarray(np.asarray(image_rgb, dtype=np.uint8).copy())
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be HxWx3, got {img.shape}")
    base = max(1, round(min(img.shape[:2]) / 240))
    thickness = thickness or base * 2
    radius = radius or base * 3
    plan = plan_drawing(persons, spec, score_thr)
    if draw_boxes:
        for x1, y1, x2, y2 in plan.boxes:
            cv2.rectangle(img, (x1, y1), (x2, y2), BOX_COLOR, max(1, base), cv2.LINE_AA)
    for edge in plan.edges:
        cv2.line(img, edge.start, edge.end, edge.color, thickness, cv2.LINE_AA)
    for joint in plan.joints:
        cv2.circle(img, joint.center, radius, joint.color, -1, cv2.LINE_AA)
    return img
