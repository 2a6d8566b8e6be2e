"""One error shape for every failure: ``{"error": {"code": ..., "message": ...}}``.

Codes are stable API: clients branch on ``code``, never on ``message``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ditepose.service.batching.batcher import (
    BatcherClosed,
    BatcherError,
    DeadlineExceeded,
    InferenceFailed,
    OutOfMemory,
    Overloaded,
)

log = logging.getLogger(__name__)

# code -> (HTTP status, what it means); documented in OpenAPI and the README.
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
    "unknown_job": (404, "No evaluation job with that id."),
    "job_finished": (409, "The job already finished; there is nothing to cancel."),
    "not_ready": (409, "The job has no predictions (yet): it did not succeed."),
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


def error_response(code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=ERROR_CODES[code][0], headers=dict(headers or {}))


def from_batcher_error(exc: BatcherError, retry_after_s: int = 1) -> ServiceError:
    """Map a batcher outcome to the HTTP-facing error."""
    if isinstance(exc, Overloaded):
        return ServiceError("overloaded", str(exc), {"Retry-After": str(retry_after_s)})
    if isinstance(exc, DeadlineExceeded):
        return ServiceError("timeout", str(exc))
    if isinstance(exc, BatcherClosed):
        return ServiceError("unavailable", str(exc))
    if isinstance(exc, OutOfMemory):  # before InferenceFailed: a subclass of it
        return ServiceError("out_of_memory", str(exc), {"Retry-After": str(retry_after_s)})
    if isinstance(exc, InferenceFailed):
        return ServiceError("inference_failed", str(exc))
    return ServiceError("internal", str(exc))


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI, retry_after_s: int = 1) -> None:
    """Replace FastAPI's default error bodies with the service's shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.code, exc.message, exc.headers)

    @app.exception_handler(BatcherError)
    async def _batcher_error(request: Request, exc: BatcherError) -> JSONResponse:
        err = from_batcher_error(exc, retry_after_s)
        return error_response(err.code, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response("invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "invalid_request" if exc.status_code < 500 else "internal"
        )
        body = error_body(code, str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response("internal", f"{type(exc).__name__}: {exc}")
