"""Synthetic people: articulated limb figures with exact keypoint labels.

No real data can be downloaded here, so tests, smoke training and the demo
checkpoint use these. Figures face the camera (the person's left is on the image
right, a convention that a horizontal flip preserves), limbs are filled capsules
in per-person colours, and visibility comes from an ownership map: a joint
covered by a later figure or an occluder is labelled "not visible".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ditepose.training.mpii_eval import save_mpii_gt

# Named body points; COCO and MPII read their joints from these.
COCO_POINTS = ("nose", "leye", "reye", "lear", "rear", "lsho", "rsho", "lelb", "relb",
               "lwri", "rwri", "lhip", "rhip", "lkne", "rkne", "lank", "rank")
MPII_POINTS = ("rank", "rkne", "rhip", "lhip", "lkne", "lank", "pelv", "thor", "neck", "head",
               "rwri", "relb", "rsho", "lsho", "lelb", "lwri")


@dataclass(frozen=True)
class Figure:
    """One drawn person: named points, head circle and limb thickness (pixels)."""

    points: dict[str, np.ndarray]
    head_center: np.ndarray
    head_radius: float
    thickness: int


def _dir(up: np.ndarray, side: np.ndarray, angle_deg: float) -> np.ndarray:
    """Unit vector at ``angle_deg`` from straight down, positive toward ``side``."""
    a = np.deg2rad(angle_deg)
    return -up * np.cos(a) + side * np.sin(a)


def random_figure(rng: np.random.Generator, pelvis: np.ndarray, height: float) -> Figure:
    """Random upright-ish pose of a figure ``height`` px tall (ankle to head top, roughly)."""
    tilt = np.deg2rad(rng.normal(0.0, 12.0))
    up = np.array([np.sin(tilt), -np.cos(tilt)])
    right = np.array([np.cos(tilt), np.sin(tilt)])  # image right = the person's left
    h = height
    p: dict[str, np.ndarray] = {"pelv": pelvis.astype(np.float64)}
    p["thor"] = p["pelv"] + up * 0.28 * h
    p["neck"] = p["thor"] + up * 0.06 * h
    r = 0.065 * h
    head_c = p["neck"] + up * r * 1.05
    p["head"] = head_c + up * r
    for side, sgn in (("l", 1.0), ("r", -1.0)):
        s = right * sgn
        p[f"{side}sho"] = p["thor"] + s * 0.11 * h
        p[f"{side}hip"] = p["pelv"] + s * 0.075 * h
        upper = rng.uniform(-25.0, 160.0)
        fore = upper + rng.uniform(-130.0, 30.0)
        p[f"{side}elb"] = p[f"{side}sho"] + _dir(up, s, upper) * 0.16 * h
        p[f"{side}wri"] = p[f"{side}elb"] + _dir(up, s, fore) * 0.15 * h
        thigh = rng.uniform(-12.0, 55.0)
        shin = thigh + rng.uniform(-45.0, 25.0)
        p[f"{side}kne"] = p[f"{side}hip"] + _dir(up, s, thigh) * 0.24 * h
        p[f"{side}ank"] = p[f"{side}kne"] + _dir(up, s, shin) * 0.23 * h
    yaw = rng.uniform(-0.45, 0.45)
    p["nose"] = head_c + right * yaw * r * 0.7 - up * 0.2 * r
    for side, sgn in (("l", 1.0), ("r", -1.0)):
        p[f"{side}eye"] = head_c + right * (sgn * 0.4 + yaw * 0.5) * r + up * 0.2 * r
        p[f"{side}ear"] = head_c + right * (sgn * 0.95 + yaw * 0.2) * r
    return Figure(points=p, head_center=head_c, head_radius=r, thickness=max(2, round(0.045 * h)))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(20, 236, size=3))  # type: ignore[return-value]


def _capsule(img: np.ndarray, a: np.ndarray, b: np.ndarray, thickness: int, colour: tuple | int) -> None:
    """A thick round-ended segment; ``colour`` is a BGR tuple on the picture, a plain int on a mask."""
    cv2.line(img, tuple(np.round(a).astype(int)), tuple(np.round(b).astype(int)), colour, thickness, cv2.LINE_AA)


def draw_figure(img: np.ndarray, owner: np.ndarray, fig: Figure, fid: int, rng: np.random.Generator) -> np.ndarray:
    """Paint ``fig`` on ``img``, mark its pixels with ``fid`` in ``owner``; returns its full mask."""
    p, t = fig.points, fig.thickness
    shirt, pants, skin = _colour(rng), _colour(rng), _colour(rng)
    mask = np.zeros(owner.shape, np.uint8)
    layers: list[tuple[str, str, int, tuple]] = [
        ("lhip", "lkne", t + 1, pants), ("lkne", "lank", t, pants),
        ("rhip", "rkne", t + 1, pants), ("rkne", "rank", t, pants),
    ]
    for a, b, th, col in layers:
        _capsule(img, p[a], p[b], th, col)
        _capsule(mask, p[a], p[b], th, 1)
    torso = np.round(np.stack([p["lsho"], p["rsho"], p["rhip"], p["lhip"]])).astype(np.int32)
    cv2.fillConvexPoly(img, torso, shirt, cv2.LINE_AA)
    cv2.fillConvexPoly(mask, torso, 1)
    darker = tuple(int(c * 0.7) for c in shirt)
    for a, b, th, col in [("lsho", "lelb", t, darker), ("lelb", "lwri", max(2, t - 1), skin),
                          ("rsho", "relb", t, darker), ("relb", "rwri", max(2, t - 1), skin),
                          ("thor", "neck", t, skin)]:
        _capsule(img, p[a], p[b], th, col)
        _capsule(mask, p[a], p[b], th, 1)
    hc, r = tuple(np.round(fig.head_center).astype(int)), max(2, round(fig.head_radius))
    cv2.circle(img, hc, r, skin, -1, cv2.LINE_AA)
    cv2.circle(mask, hc, r, 1, -1)
    dot = max(1, round(r * 0.18))
    for name, col in (("lear", darker), ("rear", darker), ("leye", (20, 20, 20)), ("reye", (20, 20, 20)),
                      ("nose", (40, 40, 200))):
        cv2.circle(img, tuple(np.round(p[name]).astype(int)), dot, col, -1, cv2.LINE_AA)
    owner[mask > 0] = fid
    return mask


def background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth colour field + noise + a few distractor shapes."""
    gw, gh = int(rng.integers(2, 7)), int(rng.integers(2, 7))
    grid = rng.integers(0, 256, size=(gh, gw, 3)).astype(np.uint8)
    img = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    img += rng.normal(0.0, rng.uniform(3.0, 14.0), size=img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 5))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(-w // 3, w // 3)), y0 + int(rng.integers(-h // 3, h // 3))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x0, y0), (x1, y1), _colour(rng), -1)
        else:
            cv2.line(img, (x0, y0), (x1, y1), _colour(rng), int(rng.integers(1, 4)))
    return img


def render_image(rng: np.random.Generator, w: int, h: int, max_people: int = 3) -> tuple[np.ndarray, list[dict]]:
    """One image and its people: each with all named points, visibility (0/1/2), box and area."""
    img = background(rng, w, h)
    owner = np.full((h, w), -1, np.int32)
    figures: list[Figure] = []
    masks: list[np.ndarray] = []
    for fid in range(int(rng.integers(1, max_people + 1))):
        height = rng.uniform(0.35, 0.95) * h
        pelvis = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.3, 0.75) * h + 0.1 * height])
        fig = random_figure(rng, pelvis, height)
        masks.append(draw_figure(img, owner, fig, fid, rng))
        figures.append(fig)
    if rng.random() < 0.3:  # an occluding object in front of everyone
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 4)), y0 + int(rng.integers(h // 10, h // 4))
        cv2.rectangle(img, (x0, y0), (x1, y1), _colour(rng), -1)
        owner[max(0, y0):y1, max(0, x0):x1] = -2
    people = []
    for fid, fig in enumerate(figures):
        vis: dict[str, int] = {}
        for name, pt in fig.points.items():
            x, y = int(pt[0]), int(pt[1])  # floor: inside the image whenever 0 <= pt < size
            if not (0 <= pt[0] < w and 0 <= pt[1] < h):
                vis[name] = 0
            else:
                vis[name] = 2 if owner[y, x] in (fid, -1) else 1
        mine = owner == fid
        if not mine.any():
            continue
        ys, xs = np.nonzero(masks[fid])  # the box covers occluded parts too, as COCO's do
        box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        hc, r = fig.head_center, fig.head_radius
        people.append({"points": fig.points, "vis": vis, "bbox": box, "area": float(mine.sum()),
                       "headbox": np.array([hc - r, hc + r])})
    return img, people


def _image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(240, 400)), int(rng.integers(240, 400))


def write_coco(out: Path, num_images: int, seed: int, split: str = "train") -> Path:
    """COCO keypoint json at ``out/annotations/person_keypoints_{split}.json``, images in ``out/{split}/``."""
    from ditepose.model.keypoints import COCO

    (out / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(num_images):
        rng = _image_rng(seed, i)
        w, h = _image_size(rng)
        img, people = render_image(rng, w, h)
        name = f"{i:06d}.jpg"
        cv2.imwrite(str(out / split / name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for person in people:
            kpts: list[float] = []
            for pname in COCO_POINTS:
                v = person["vis"][pname]
                x, y = person["points"][pname]
                kpts += [round(float(x), 2), round(float(y), 2), v] if v > 0 else [0.0, 0.0, 0]
            x, y, bw, bh = person["bbox"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "bbox": person["bbox"], "area": person["area"], "keypoints": kpts,
                "num_keypoints": sum(1 for v in kpts[2::3] if v > 0),
                "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
            })
    data = {
        "info": {"description": f"DitePose synthetic people (seed {seed})"},
        "images": images, "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "supercategory": "person",
                        "keypoints": list(COCO.joint_names),
                        "skeleton": [[a + 1, b + 1] for a, b in COCO.skeleton]}],
    }
    path = out / "annotations" / f"person_keypoints_{split}.json"
    path.write_text(json.dumps(data))
    return path


def write_mpii(out: Path, num_images: int, seed: int, split: str = "train") -> Path:
    """mmpose-MPII json ``out/annotations/mpii_{split}.json`` (1-based joints/center), gt file beside it."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    entries, gt_joints, gt_vis, gt_heads = [], [], [], []
    for i in range(num_images):
        rng = _image_rng(seed, i)
        w, h = _image_size(rng)
        img, people = render_image(rng, w, h)
        name = f"{split}_{i:06d}.jpg"
        cv2.imwrite(str(out / "images" / name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        for person in people:
            joints = np.stack([person["points"][n] for n in MPII_POINTS])
            vis = np.array([1 if person["vis"][n] == 2 else 0 for n in MPII_POINTS])
            x, y, bw, bh = person["bbox"]
            entries.append({
                "image": name,
                "center": [x + bw / 2 + 1.0, y + bh / 2 + 1.0],
                "scale": max(bw, bh) / 200.0,
                "joints": (joints + 1.0).round(2).tolist(),
                "joints_vis": vis.tolist(),
            })
            gt_joints.append(joints)
            gt_vis.append(vis)
            gt_heads.append(person["headbox"] + 1.0)
    path = out / "annotations" / f"mpii_{split}.json"
    path.write_text(json.dumps(entries))
    save_mpii_gt(out / "annotations" / f"mpii_gt_{split}.json", np.array(gt_joints).reshape(-1, 16, 2),
                 np.array(gt_vis).reshape(-1, 16), np.array(gt_heads).reshape(-1, 2, 2))
    return path


def synthesize(fmt: str, out: str | Path, num_images: int, seed: int = 0, split: str = "train") -> Path:
    """Write a synthetic dataset split; returns the annotation file."""
    if num_images < 1:
        raise ValueError("num_images must be >= 1")
    out = Path(out)
    if fmt == "coco":
        return write_coco(out, num_images, seed, split)
    if fmt == "mpii":
        return write_mpii(out, num_images, seed, split)
    raise ValueError(f"unknown synthetic format {fmt!r}; choose 'coco' or 'mpii'")
