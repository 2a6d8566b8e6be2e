"""``POST /v1/videos``: a video (an upload, or a name from the server's catalogue) in, a video job out.

An upload is never held whole in memory: the multipart body is read chunk by chunk
(``request.stream()``) through python-multipart's streaming parser, and the ``video`` part's bytes
go straight into a file under ``jobs_dir/videos`` (:class:`~ditepose.service.jobs.video.UploadSink`),
which stops at ``video_max_upload_bytes`` (413) and checks the container signature in the first
bytes (415). The job service then probes the file with PyAV (422 ``invalid_video`` when not one
frame decodes) before it accepts the job (202 + ``Location``). Options come as form fields or as
one ``options`` part holding JSON (the untrusted-JSON reader), or as the top-level fields of a
JSON body naming a catalogue video; :mod:`ditepose.service.jobs.video_schemas` validates all three.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ditepose.service.core.errors import ServiceError
from ditepose.service.core.untrusted_json import JSON_OBJECT, describe, read_json
from ditepose.service.http.deps import JobServiceDep
from ditepose.service.http.routes import error_responses
from ditepose.service.http.untrusted_body import MAX_JSON_BODY_BYTES, declares_json
from ditepose.service.jobs.catalogue import BadName, UnknownName
from ditepose.service.jobs.executor import BrokerUnavailable
from ditepose.service.jobs.manager import JobService, UnknownModel
from ditepose.service.jobs.schemas import JobAccepted
from ditepose.service.jobs.video import NotAVideoFile, UploadSink, UploadTooLarge, videos_root
from ditepose.service.jobs.video_schemas import (
    MAX_FIELD_BYTES,
    MAX_OPTIONS_BYTES,
    VideoJobOptions,
    VideoJsonRequest,
    options_from_fields,
    options_from_json_part,
)
from ditepose.service.video.decode import NoDecodableFrames, NotAVideo, NoVideoStream

router = APIRouter(prefix="/v1", tags=["jobs"])

MAX_FORM_PARTS = 32

_BODY_DOC: dict[str, Any] = {
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["video"], "properties": {
            "video": {"type": "string", "format": "binary", "description": "The video file (MP4/MOV, MKV/WebM, "
                      "AVI; H.264, H.265, VP9, MJPEG, ...)."},
            "options": {"type": "string", "description": "The options as one JSON object (instead of fields)."},
            **{name: {"type": "string", "description": str(f.description)}
               for name, f in VideoJobOptions.model_fields.items()}}}},
        "application/json": {"schema": VideoJsonRequest.model_json_schema()},
    }},
}


class _StreamedForm:
    """Feeds python-multipart's parser and routes each part: ``video`` into an :class:`UploadSink`, the
    other parts (form fields, ``options``) into small bounded buffers."""

    def __init__(self, boundary: bytes, sink: UploadSink) -> None:
        self.sink = sink
        self.fields: dict[str, bytes] = {}
        self.video_parts = 0
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._part: str | None = None
        callbacks: Any = {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data,
            "on_header_field": self._header_field, "on_header_value": self._header_value_data,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def _part_begin(self) -> None:
        self._headers, self._part = {}, None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise ServiceError("invalid_request", "form: a part without a name")
        if name == "video":
            self.video_parts += 1
            if self.video_parts > 1:
                raise ServiceError("invalid_request", "form: more than one `video` part")
        else:
            if name in self.fields or len(self.fields) >= MAX_FORM_PARTS:
                raise ServiceError("invalid_request", f"form: part {name[:40]!r} repeated, or too many parts")
            self.fields[name] = b""
        self._part = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "video":
            self.sink.write(data[start:end])
        elif self._part is not None:
            value = self.fields[self._part] + data[start:end]
            limit = MAX_OPTIONS_BYTES if self._part == "options" else MAX_FIELD_BYTES
            if len(value) > limit:
                raise ServiceError("invalid_request", f"form: part {self._part[:40]!r} is over {limit} bytes")
            self.fields[self._part] = value

    def options(self) -> VideoJobOptions:
        if "options" in self.fields:
            if len(self.fields) > 1:
                raise ServiceError("invalid_request", "form: give the options as fields or as one `options` JSON "
                                   f"part, not both (fields: {sorted(set(self.fields) - {'options'})})")
            return options_from_json_part(self.fields["options"])
        try:
            text = {k: v.decode("utf-8") for k, v in self.fields.items()}
        except UnicodeDecodeError as exc:
            raise ServiceError("invalid_request", "form: a field is not UTF-8 text") from exc
        return options_from_fields(text)


async def _receive_upload(request: Request, jobs: JobService) -> tuple[UploadSink, VideoJobOptions]:
    """Stream the multipart body to disk; the sink (finished) and the options. Errors discard the file."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServiceError("invalid_request", "multipart/form-data without a boundary")
    settings = jobs.settings
    sink = UploadSink(videos_root(settings), settings.video_max_upload_bytes)
    try:
        form = _StreamedForm(boundary, sink)
        async for chunk in request.stream():
            form.parser.write(chunk)
        form.parser.finalize()
        if form.video_parts == 0:
            raise ServiceError("invalid_request", "form: no `video` part (the file)")
        options = form.options()
        sink.finish()
    except UploadTooLarge as exc:
        sink.discard()
        raise ServiceError("too_large", str(exc)) from None
    except NotAVideoFile as exc:
        sink.discard()
        raise ServiceError("unsupported_media", str(exc)) from None
    except MultipartParseError as exc:
        sink.discard()
        raise ServiceError("invalid_request", f"form: not a valid multipart/form-data body ({exc})") from None
    except BaseException:
        sink.discard()
        raise
    return sink, options


async def _read_json_body(request: Request) -> VideoJsonRequest:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BODY_BYTES:
            raise ServiceError("too_large", f"a JSON body over {MAX_JSON_BODY_BYTES} bytes")
    value = read_json(body, JSON_OBJECT, field="body", max_bytes=MAX_JSON_BODY_BYTES)
    try:
        return VideoJsonRequest.model_validate(value)
    except ValidationError as exc:
        raise ServiceError("invalid_request", describe(exc, "body")) from None


async def _submit(jobs: JobService, options: VideoJobOptions, upload: UploadSink | None,
                  catalogue: str | None) -> Any:
    try:
        if upload is not None:
            return await asyncio.to_thread(jobs.submit_video, options, upload.path, upload.suffix or ".mp4")
        return await asyncio.to_thread(jobs.submit_video, options, None, ".mp4", catalogue)
    except UnknownModel as exc:
        raise ServiceError("unknown_model", str(exc)) from exc
    except UnknownName as exc:
        raise ServiceError("unknown_video", str(exc)) from exc
    except BadName as exc:
        raise ServiceError("invalid_request", str(exc)) from exc
    except NoVideoStream as exc:
        raise ServiceError("unsupported_media", str(exc)) from exc
    except (NotAVideo, NoDecodableFrames) as exc:
        # past the signature check: a video container FFmpeg cannot read (truncated, damaged) or no frame
        raise ServiceError("invalid_video", str(exc)) from exc
    except BrokerUnavailable as exc:
        raise ServiceError("unavailable", f"video jobs are unavailable: {exc}") from exc
    finally:
        if upload is not None:
            Path(upload.path).unlink(missing_ok=True)  # moved into the job's folder when accepted


@router.post("/videos", status_code=202, response_model=JobAccepted, summary="Start a video job: tracks out",
             openapi_extra=_BODY_DOC,
             responses=error_responses("unknown_video", "unknown_model", "too_large", "unsupported_media",
                                       "invalid_video", "invalid_request", "unavailable"))
async def submit_video(request: Request, jobs: JobServiceDep) -> JSONResponse:
    """Upload a video (multipart: part `video`, options as fields or one JSON `options` part), or name one
    of the server's catalogue (JSON: `{"video": "<name>", ...options}`). Answers 202 once the video was
    stored and probed; poll the job at `Location`, then `GET /v1/jobs/{id}/result?format=json|csv|coco|mp4`."""
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    if content_type == b"multipart/form-data":
        upload, options = await _receive_upload(request, jobs)
        rec = await _submit(jobs, options, upload, None)
    elif declares_json(request):
        req = await _read_json_body(request)
        rec = await _submit(jobs, req.options(), None, req.video)
    else:
        raise ServiceError("unsupported_media", f"content type {content_type.decode('latin-1')[:80]!r}: send "
                           "multipart/form-data (a `video` part) or application/json (a catalogue name)")
    location = f"/v1/jobs/{rec.id}"
    body = JobAccepted(id=rec.id, state="queued", location=location).model_dump()
    return JSONResponse(body, status_code=202, headers={"Location": location})
