"""The result of a video job: per-person tracks over time, and the ``json``, ``csv`` and ``coco`` files.

A :class:`VideoResult` is the video's facts (:class:`VideoMeta`), the model that ran and one
:class:`TrackSeries` per person: the frames it was seen in, their timestamps, its box, its
keypoints and where the box came from (``detected`` by the person detector or ``carried`` from
the previous frame's keypoints) on each of them. Columns, not rows, because that is what users
of a video result plot and filter (a joint's x over time is ``keypoints[:, j, 0]``).

Keypoints scoring below ``score_threshold`` are *marked*, never zeroed: every file keeps their
x, y and score and says they are not visible (``visible`` in json, a column in csv, v=1 instead
of v=2 in coco, COCO's "labelled but not visible"). A user may want the weak guesses (plots,
their own threshold); a keypoint moved to (0, 0) would look like a real position.

Files:

* ``json``: the issue's shape, ``{"video": {...}, "model", "model_version", "tracks": [...]}``,
  each track ``{"track_id", "frames", "timestamps", "boxes" [[x, y, w, h]], "keypoints"
  [[[x, y, score] * K]], "visible" [[bool * K]], "box_source", "scores"}``, plus ``joints``
  (the keypoint names) and ``score_threshold``; :func:`result_from_json` reads it back.
* ``csv``: one row per (track, frame, joint), written row by row.
* ``coco``: COCO keypoint results, one entry per person and frame, ``image_id`` = frame index,
  with ``track_id`` and the raw ``keypoint_scores`` beside the COCO fields.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np

BoxSource = Literal["detected", "carried"]
BOX_SOURCES: tuple[str, ...] = ("detected", "carried")
CSV_COLUMNS = ("track_id", "frame", "timestamp", "joint", "joint_name", "x", "y", "score", "visible",
               "box_x", "box_y", "box_w", "box_h", "box_source", "person_score")


@dataclass(frozen=True)
class VideoMeta:
    """The decoded video's facts, as the result files report them."""

    fps: float
    frames: int
    width: int
    height: int
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"fps": self.fps, "frames": self.frames, "width": self.width, "height": self.height,
                "duration_s": self.duration_s}


@dataclass
class TrackSeries:
    """One person over time; every column has one entry per frame the person was seen in."""

    track_id: int
    frames: list[int] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # [F, 4] xywh
    keypoints: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 3)))  # [F, K, 3] x, y, score
    box_source: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # the person's score per frame

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float64).reshape(-1, 4)
        self.keypoints = np.asarray(self.keypoints, np.float64)
        if self.keypoints.size == 0 and self.keypoints.ndim != 3:  # [] -> [0, 0, 3]; [0, K, 3] keeps its K
            self.keypoints = self.keypoints.reshape(len(self.frames), 0, 3)
        lengths = {len(self.frames), len(self.timestamps), len(self.boxes), len(self.keypoints),
                   len(self.box_source), len(self.scores)}
        if len(lengths) != 1:
            raise ValueError(f"track {self.track_id}: columns of different lengths {sorted(lengths)}")
        if any(b >= a for a, b in zip(self.frames[1:], self.frames, strict=False)):
            raise ValueError(f"track {self.track_id}: frames must increase")

    def __len__(self) -> int:
        return len(self.frames)

    def select(self, keep: np.ndarray | list[bool]) -> TrackSeries:
        """The same track on the frames where ``keep`` is true."""
        mask = np.asarray(keep, bool)
        pick = np.flatnonzero(mask).tolist()
        return TrackSeries(self.track_id, [self.frames[i] for i in pick], [self.timestamps[i] for i in pick],
                           self.boxes[mask], self.keypoints[mask], [self.box_source[i] for i in pick],
                           [self.scores[i] for i in pick])

    def to_dict(self, score_threshold: float) -> dict[str, Any]:
        return {
            "track_id": self.track_id,
            "frames": list(self.frames),
            "timestamps": list(self.timestamps),
            "boxes": self.boxes.tolist(),
            "keypoints": self.keypoints.tolist(),
            "visible": (self.keypoints[..., 2] >= score_threshold).tolist(),
            "box_source": list(self.box_source),
            "scores": list(self.scores),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrackSeries:
        frames = [int(f) for f in data["frames"]]
        return cls(int(data["track_id"]), frames, [float(t) for t in data["timestamps"]],
                   np.asarray(data["boxes"], np.float64).reshape(-1, 4),
                   np.asarray(data["keypoints"], np.float64).reshape(len(frames), -1, 3),
                   [str(s) for s in data["box_source"]], [float(s) for s in data["scores"]])


@dataclass
class VideoResult:
    """Everything a video job answers (module docstring)."""

    video: VideoMeta
    model: str
    model_version: str
    joint_names: tuple[str, ...]
    tracks: list[TrackSeries]
    score_threshold: float = 0.3

    def to_dict(self) -> dict[str, Any]:
        return {
            "video": self.video.to_dict(),
            "model": self.model,
            "model_version": self.model_version,
            "joints": list(self.joint_names),
            "score_threshold": self.score_threshold,
            "tracks": [t.to_dict(self.score_threshold) for t in self.tracks],
        }

    def persons_by_frame(self) -> dict[int, list[tuple[TrackSeries, int]]]:
        """frame index -> (track, row in that track) of everyone seen in it, by track id."""
        out: dict[int, list[tuple[TrackSeries, int]]] = {}
        for track in sorted(self.tracks, key=lambda t: t.track_id):
            for row, frame in enumerate(track.frames):
                out.setdefault(frame, []).append((track, row))
        return out


def result_from_json(data: dict[str, Any]) -> VideoResult:
    """A :class:`VideoResult` back from :meth:`VideoResult.to_dict` (or its json file)."""
    video = data["video"]
    meta = VideoMeta(float(video["fps"]), int(video["frames"]), int(video["width"]), int(video["height"]),
                     float(video["duration_s"]))
    return VideoResult(meta, str(data["model"]), str(data["model_version"]), tuple(data.get("joints", ())),
                       [TrackSeries.from_dict(t) for t in data["tracks"]], float(data.get("score_threshold", 0.3)))


def write_json(result: VideoResult, out: TextIO) -> None:
    json.dump(result.to_dict(), out)


def csv_rows(result: VideoResult) -> Iterator[list[Any]]:
    """The csv body, one (track, frame, joint) at a time, tracks by id and frames in order."""
    names = result.joint_names
    thr = result.score_threshold
    for track in sorted(result.tracks, key=lambda t: t.track_id):
        for row, frame in enumerate(track.frames):
            box = track.boxes[row].tolist()
            for joint, (x, y, score) in enumerate(track.keypoints[row].tolist()):
                name = names[joint] if joint < len(names) else str(joint)
                yield [track.track_id, frame, track.timestamps[row], joint, name, x, y, score, int(score >= thr),
                       *box, track.box_source[row], track.scores[row]]


def write_csv(result: VideoResult, out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(csv_rows(result))


def coco_entries(result: VideoResult) -> list[dict[str, Any]]:
    """COCO keypoint results (category 1, person): v=2 at or above the threshold, v=1 below."""
    entries: list[dict[str, Any]] = []
    thr = result.score_threshold
    for frame, persons in sorted(result.persons_by_frame().items()):
        for track, row in persons:
            kpts = track.keypoints[row]
            flat: list[float] = []
            for x, y, score in kpts.tolist():
                flat.extend((x, y, 2 if score >= thr else 1))
            entries.append({"image_id": frame, "category_id": 1, "keypoints": flat,
                            "score": track.scores[row], "bbox": track.boxes[row].tolist(),
                            "track_id": track.track_id, "keypoint_scores": kpts[:, 2].tolist(),
                            "timestamp": track.timestamps[row]})
    return entries


def write_coco(result: VideoResult, out: TextIO) -> None:
    json.dump(coco_entries(result), out)


RESULT_FORMATS = ("json", "csv", "coco")


def write_result(result: VideoResult, path: str | Path, fmt: str = "json") -> Path:
    """Write ``result`` as ``fmt`` ("json", "csv", "coco") to ``path`` (mp4: :mod:`.render`)."""
    writers = {"json": write_json, "csv": write_csv, "coco": write_coco}
    if fmt not in writers:
        raise ValueError(f"format must be one of {RESULT_FORMATS}, got {fmt!r}")
    path = Path(path)
    with path.open("w", encoding="utf-8", newline="") as out:
        writers[fmt](result, out)
    return path
