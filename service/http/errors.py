"""The REST answer of every failure: FastAPI's exception handlers in the service's error shape.

The codes, :class:`~ditepose.service.core.errors.ServiceError` and the body live in core (gRPC and
jobs use them too); only the HTTP side of them is here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ditepose.service.batching.batcher import BatcherError
from ditepose.service.core.errors import ERROR_CODES, ServiceError, error_body, from_batcher_error

log = logging.getLogger(__name__)


def error_response(code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=ERROR_CODES[code][0], headers=dict(headers or {}))


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
