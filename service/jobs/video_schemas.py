"""The options of a video job (``POST /v1/videos``), validated once here for every way they arrive.

Three forms carry the same options (docs/jobs.md, "Video jobs"): multipart form fields next to
the ``video`` part, one multipart ``options`` part holding a JSON object, or the top-level fields
of a JSON body that names a catalogue video. Each form ends in :class:`VideoJobOptions`, so the
defaults, bounds and error messages are the same whichever a client uses.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ditepose.model.detectors import DetectorName
from ditepose.service.core.errors import ServiceError
from ditepose.service.core.untrusted_json import JSON_OBJECT, describe, read_json

Smoothing = Literal["none", "one_euro", "savgol"]
MAX_OPTIONS_BYTES = 16 * 1024  # a handful of names and numbers
MAX_FIELD_BYTES = 1024  # one form field's value


class VideoJobOptions(BaseModel):
    """How a video is processed; every field optional (the issue's list, docs/jobs.md)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(default=None, description="Served model name (GET /v1/models). Default: the "
                              "service's default model.")
    detector: DetectorName | None = Field(default=None, description="Person detector. Default: the service's "
                                          "(nanodet for 'auto').")
    detect_interval: int = Field(default=5, ge=1, le=1000, description="Run the detector on every N-th frame "
                                 "(frames 0, N, 2N, ...); the frames between take boxes carried from the "
                                 "previous frame's keypoints.")
    flip_test: bool = Field(default=True, description="Average each crop with its mirror image (about 2x the "
                            "pose cost).")
    score_threshold: float = Field(default=0.3, ge=0.0, le=1.0, description="Keypoints scoring below it are "
                                   "marked not visible (score and position kept).")
    smoothing: Smoothing = Field(default="none", description="'savgol': two-sided Savitzky-Golay over each "
                                 "whole track (offline); 'one_euro': the live stream's causal filter.")
    render: bool = Field(default=False, description="Also write the annotated video (result format mp4).")
    max_persons: int | None = Field(default=None, ge=1, le=100, description="At most this many persons per "
                                    "detection (the best scoring). Default: 20.")


class VideoJsonRequest(VideoJobOptions):
    """``application/json`` body: a video of the server's catalogue plus the options as top-level fields."""

    video: str = Field(description="Name of a video in the server's catalogue (DITEPOSE_VIDEOS or a file "
                       "name in DITEPOSE_VIDEO_DIR).", examples=["walk.mp4"])

    def options(self) -> VideoJobOptions:
        return VideoJobOptions.model_validate(self.model_dump(exclude={"video"}))


def _invalid(exc: ValidationError, field: str) -> ServiceError:
    return ServiceError("invalid_request", describe(exc, field))


def options_from_fields(fields: dict[str, str]) -> VideoJobOptions:
    """Options sent as multipart form fields (strings; pydantic converts "true", "5", "0.4")."""
    for name, value in fields.items():
        if len(value.encode()) > MAX_FIELD_BYTES:
            raise ServiceError("invalid_request", f"{name}: longer than {MAX_FIELD_BYTES} bytes")
    try:
        return VideoJobOptions.model_validate(fields, strict=False)
    except ValidationError as exc:
        raise _invalid(exc, "form") from None


def options_from_json_part(raw: bytes) -> VideoJobOptions:
    """Options sent as one multipart ``options`` part holding a JSON object (the untrusted-JSON reader)."""
    value: dict[str, Any] = read_json(raw, JSON_OBJECT, field="options", max_bytes=MAX_OPTIONS_BYTES)
    try:
        return VideoJobOptions.model_validate(value)
    except ValidationError as exc:
        raise _invalid(exc, "options") from None
