"""A small typed Python client of the DitePose REST API: ``POST /v1/pose``, ``POST /v1/videos`` and the jobs.

Why a client of our own: the ``ditepose video --server`` command and the tests need the same
calls a user's script makes (upload, poll with progress, fetch a result), and every caller should
meet errors the same way. Every non-2xx answer becomes one :class:`ApiError` carrying the HTTP
status and the service's stable ``code`` and ``message`` from its ``{"error": {...}}`` body, so
callers branch on ``code`` (``"unknown_model"``, ``"too_large"``, ``"not_ready"`` ...), never on text.

It imports nothing of the model, training or service packages (an import-linter contract in
``pyproject.toml`` holds it to that): a user's script pulls in httpx, not torch.

Uploads and downloads are streamed: a video goes out of its file in chunks (httpx reads file
objects piecewise), and :meth:`DitePoseClient.download_result` writes the answer to disk as it
arrives, so neither side of a long video is held whole in memory.

    with DitePoseClient("http://127.0.0.1:8000") as api:
        job = api.submit_video("walk.mp4", VideoJobOptions(detect_interval=5, flip_test=False))
        done = api.wait(job.id, on_progress=lambda j: print(f"{j.progress:.0f}%"))
        tracks = api.result(done.id)                 # the json result, parsed
        api.download_result(done.id, "csv", "tracks.csv")
"""

from __future__ import annotations

import json
import mimetypes
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import httpx

__all__ = [
    "TERMINAL_STATES",
    "ApiError",
    "DitePoseClient",
    "Job",
    "JobAccepted",
    "Keypoint",
    "Person",
    "PoseResult",
    "ResultFormat",
    "VideoJobOptions",
]

ResultFormat = Literal["json", "csv", "coco", "mp4"]
RESULT_FORMATS: tuple[str, ...] = ("json", "csv", "coco", "mp4")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
API_KEY_HEADER = "X-API-Key"  # service/http/security.py
_CHUNK_BYTES = 1 << 16


class ApiError(Exception):
    """A request the service refused or could not answer.

    ``status`` is the HTTP status (0 when no answer came: refused connection, timeout); ``code``
    the service's stable error code (``"unreachable"`` without an answer, ``"http_<status>"`` when
    the body was not the service's error JSON, e.g. a proxy's page)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code} ({status}): {message}" if status else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Keypoint:
    name: str
    x: float
    y: float
    score: float


@dataclass(frozen=True)
class Person:
    bbox: tuple[float, ...]  # x, y, w, h of the box the keypoints were estimated in
    score: float
    keypoints: tuple[Keypoint, ...]


@dataclass(frozen=True)
class PoseResult:
    """``POST /v1/pose``'s answer."""

    model: str
    model_version: str
    width: int
    height: int
    persons: tuple[Person, ...]
    timings: Mapping[str, float]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PoseResult:
        persons = tuple(
            Person(tuple(float(v) for v in p["bbox"]), float(p["score"]),
                   tuple(Keypoint(str(k["name"]), float(k["x"]), float(k["y"]), float(k["score"]))
                         for k in p["keypoints"]))
            for p in data["persons"])
        return cls(str(data["model"]), str(data.get("model_version", "")), int(data["image"]["width"]),
                   int(data["image"]["height"]), persons, dict(data.get("timings", {})))


@dataclass(frozen=True)
class JobAccepted:
    """The 202 answer of a job submission: poll ``location`` (or :meth:`DitePoseClient.wait`)."""

    id: str
    state: str
    location: str


@dataclass(frozen=True)
class Job:
    """A job as ``GET /v1/jobs/{id}`` shows it; ``raw`` keeps every field (metrics, timings, ...)."""

    id: str
    state: str
    kind: str
    progress: float
    frames_done: int | None
    frames_total: int | None
    result_url: str | None
    error: str | None
    cancel_requested: bool
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        def optional_int(key: str) -> int | None:
            value = data.get(key)
            return None if value is None else int(value)

        return cls(str(data["id"]), str(data["state"]), str(data.get("kind", "evaluation")),
                   float(data.get("progress", 0.0)), optional_int("frames_done"), optional_int("frames_total"),
                   data.get("result_url"), data.get("error"), bool(data.get("cancel_requested", False)), dict(data))


@dataclass(frozen=True)
class VideoJobOptions:
    """The options of ``POST /v1/videos``; None leaves the server's default (docs/video.md)."""

    model: str | None = None
    detector: str | None = None
    detect_interval: int | None = None
    flip_test: bool | None = None
    score_threshold: float | None = None
    smoothing: Literal["none", "one_euro", "savgol"] | None = None
    render: bool | None = None
    max_persons: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The options given, as the JSON object the API reads."""
        return {k: v for k, v in asdict(self).items() if v is not None}


class DitePoseClient:
    """One HTTP connection pool to a DitePose server; use as a context manager or call :meth:`close`."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DitePoseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ pose
    def pose(self, image: bytes | str | Path, boxes: Sequence[Sequence[float]] | None = None, *,
             model: str | None = None, flip_test: bool | None = None, decoder: str | None = None,
             score_threshold: float | None = None, detector: str | None = None) -> PoseResult:
        """Keypoints of the persons in one JPEG/PNG/WebP (bytes or a file path); without ``boxes``
        the server's person detector finds them."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        fields: dict[str, str] = {}
        if boxes is not None:
            fields["boxes"] = json.dumps([[float(v) for v in box] for box in boxes])
        for key, value in (("model", model), ("decoder", decoder), ("detector", detector)):
            if value is not None:
                fields[key] = value
        if flip_test is not None:
            fields["flip_test"] = "true" if flip_test else "false"
        if score_threshold is not None:
            fields["score_threshold"] = repr(float(score_threshold))
        response = self._send("POST", "/v1/pose", files={"image": ("image", data, "application/octet-stream")},
                              data=fields)
        return PoseResult.from_json(response.json())

    # ------------------------------------------------------------------ videos
    def submit_video(self, path: str | Path, options: VideoJobOptions | None = None) -> JobAccepted:
        """Upload a video file (streamed from disk) as a video job; returns at once (202)."""
        path = Path(path)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        fields = {"options": json.dumps((options or VideoJobOptions()).to_json())}
        with path.open("rb") as fh:
            response = self._send("POST", "/v1/videos", files={"video": (path.name, fh, content_type)}, data=fields)
        return _accepted(response.json())

    def submit_catalogue_video(self, name: str, options: VideoJobOptions | None = None) -> JobAccepted:
        """A video job on a video the server's catalogue names (nothing is uploaded)."""
        body = {"video": name, **(options or VideoJobOptions()).to_json()}
        return _accepted(self._send("POST", "/v1/videos", json=body).json())

    # ------------------------------------------------------------------ jobs
    def job(self, job_id: str) -> Job:
        return Job.from_json(self._send("GET", f"/v1/jobs/{job_id}").json())

    def jobs(self, limit: int | None = None) -> list[Job]:
        """Recent jobs (evaluation and video), newest first."""
        params = {"limit": limit} if limit is not None else None
        return [Job.from_json(j) for j in self._send("GET", "/v1/jobs", params=params).json()["jobs"]]

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (ApiError ``job_finished`` when it already ended)."""
        return Job.from_json(self._send("DELETE", f"/v1/jobs/{job_id}").json())

    def wait(self, job_id: str, on_progress: Callable[[Job], None] | None = None, poll_s: float = 0.5,
             timeout: float | None = None) -> Job:
        """Poll the job until it succeeded, failed or was cancelled, and return it (not raising on
        failure: check ``state`` and ``error``). ``on_progress(job)`` after every poll; TimeoutError
        after ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout:g} s")
            time.sleep(poll_s)

    @overload
    def result(self, job_id: str, format: Literal["json"] = "json") -> dict[str, Any]: ...
    @overload
    def result(self, job_id: str, format: Literal["coco"]) -> list[dict[str, Any]]: ...
    @overload
    def result(self, job_id: str, format: Literal["csv", "mp4"]) -> bytes: ...

    def result(self, job_id: str, format: ResultFormat = "json") -> dict[str, Any] | list[dict[str, Any]] | bytes:
        """A succeeded video job's result in memory: ``json`` and ``coco`` parsed, ``csv`` and
        ``mp4`` as bytes (for a long video prefer :meth:`download_result`). ApiError ``not_ready``
        while the job runs."""
        response = self._send("GET", f"/v1/jobs/{job_id}/result", params={"format": _checked(format)})
        return response.json() if format in ("json", "coco") else response.content

    def download_result(self, job_id: str, format: ResultFormat, path: str | Path) -> Path:
        """Write a succeeded video job's result to ``path`` as it arrives; returns the path. The file
        is written beside ``path`` and renamed into place, so a failed download leaves nothing half-written."""
        path = Path(path)
        partial = path.with_name(path.name + ".part")
        with self._stream("GET", f"/v1/jobs/{job_id}/result", params={"format": _checked(format)}) as response:
            try:
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes(_CHUNK_BYTES):
                        out.write(chunk)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        partial.replace(path)
        return path

    # ------------------------------------------------------------------ transport
    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if response.is_error:
            raise error_from_response(response)
        return response

    @contextmanager
    def _stream(self, method: str, url: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(method, url, **kwargs) as response:
                if response.is_error:
                    response.read()
                    raise error_from_response(response)
                yield response
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc


def error_from_response(response: httpx.Response) -> ApiError:
    """The :class:`ApiError` of a non-2xx answer (its JSON error body, or the bare status)."""
    try:
        body = response.json()
        error = body["error"]
        return ApiError(response.status_code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:200] or response.reason_phrase
        return ApiError(response.status_code, f"http_{response.status_code}", text)


def _unreachable(exc: httpx.HTTPError) -> ApiError:
    return ApiError(0, "unreachable", f"{type(exc).__name__}: {exc}")


def _accepted(data: Mapping[str, Any]) -> JobAccepted:
    return JobAccepted(str(data["id"]), str(data.get("state", "queued")), str(data["location"]))


def _checked(format: str) -> str:
    if format not in RESULT_FORMATS:
        raise ValueError(f"format must be one of {RESULT_FORMATS}, got {format!r}")
    return format
