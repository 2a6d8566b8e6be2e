"""One error shape for every failure: ``{"error": {"code": ..., "message": ...}}``.

Codes are stable API: clients branch on ``code``, never on ``message``. This module knows no
transport: REST answers these errors in :mod:`ditepose.service.http.errors`, gRPC maps their codes
to statuses in :mod:`ditepose.service.grpc.convert`.
"""

from __future__ import annotations

from collections.abc import Mapping

from ditepose.service.batching.batcher import (
    BatcherClosed,
    BatcherError,
    DeadlineExceeded,
    InferenceFailed,
    OutOfMemory,
    Overloaded,
)

# code -> (HTTP status, what it means); documented in OpenAPI and docs/api.md.
ERROR_CODES: dict[str, tuple[int, str]] = {
    "invalid_request": (422, "The request does not match the schema (field, type or JSON/base64 syntax)."),
    "not_an_image": (415, "The upload is not a JPEG, PNG or WebP image."),
    "undecodable": (422, "The image header was read but its data could not be decoded (truncated or corrupt)."),
    "too_large": (413, "The body, the encoded image or its pixel count exceeds the configured limit."),
    "bad_boxes": (422, "A box is malformed, not finite, has no area, lies outside the image, or there are too many."),
    "unknown_model": (404, "No served model has that name."),
    "unauthorized": (401, "Missing or wrong X-API-Key."),
    "overloaded": (429, "Too many requests in flight, or the queue is full; retry after the Retry-After seconds."),
    "timeout": (504, "No answer within the request deadline."),
    "inference_failed": (500, "The forward pass failed for this batch."),
    "out_of_memory": (503, "The device ran out of memory for this batch; retry after the Retry-After seconds "
                      "(fewer persons per request need less)."),
    "unavailable": (503, "The service is starting or shutting down, or a part it needs (a model, Redis) is missing."),
    "unknown_dataset": (404, "No dataset of that name in the server's evaluation catalogue."),
    "unknown_job": (404, "No job with that id (of that kind, for /predictions and /result)."),
    "job_finished": (409, "The job already finished; there is nothing to cancel."),
    "not_ready": (409, "The job has no predictions (yet): it did not succeed."),
    "unsupported_media": (415, "The upload is not a video container the service reads (MP4/MOV, MKV/WebM, AVI)."),
    "invalid_video": (422, "The video has no decodable frame (empty, truncated or corrupt)."),
    "unknown_video": (404, "No video of that name in the server's video catalogue."),
    "not_rendered": (404, "The video job did not render an annotated video (submit it with render=true)."),
    "result_expired": (410, "The job's result files were deleted after DITEPOSE_VIDEO_RESULT_TTL_S."),
    "not_found": (404, "No such route."),
    "method_not_allowed": (405, "The route does not accept this method."),
    "internal": (500, "Unexpected server error."),
}


class ServiceError(Exception):
    """An error with a stable code; its HTTP status comes from :data:`ERROR_CODES`."""

    def __init__(self, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = ERROR_CODES[code][0]
        self.headers = dict(headers or {})


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


# The batcher's outcomes, subclasses before their bases (the first class an error is an instance of
# wins): the one table that both the HTTP-facing mapping below and the inference host's channel
# (:mod:`ditepose.service.host.remote`, which names errors across processes) read.
BATCHER_OUTCOMES: tuple[tuple[type[BatcherError], str], ...] = (
    (Overloaded, "overloaded"),
    (DeadlineExceeded, "timeout"),
    (BatcherClosed, "unavailable"),
    (OutOfMemory, "out_of_memory"),
    (InferenceFailed, "inference_failed"),
)
# Outcomes a client should retry after a pause: their error carries a Retry-After header.
_RETRY_LATER = frozenset({"overloaded", "out_of_memory"})


def from_batcher_error(exc: BatcherError, retry_after_s: int = 1) -> ServiceError:
    """Map a batcher outcome to the error with a stable code (both transports answer it)."""
    for cls, code in BATCHER_OUTCOMES:
        if isinstance(exc, cls):
            headers = {"Retry-After": str(retry_after_s)} if code in _RETRY_LATER else None
            return ServiceError(code, str(exc), headers)
    return ServiceError("internal", str(exc))
