"""Pure ASGI middleware: request metrics, early admission control and a hard limit on body size.

All are plain ASGI (no BaseHTTPMiddleware) so they add little latency and see the body
stream: admission control sheds from the headers alone, the size limit refuses a too-large
Content-Length before reading anything and cuts off chunked uploads as soon as they pass the limit.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ditepose.service.core.admission import Admission
from ditepose.service.core.errors import ERROR_CODES, ServiceError, error_body
from ditepose.service.core.metrics import ServiceMetrics

# scope key naming the route of a request answered before routing (read by RequestMetrics)
ROUTE_KEY = "ditepose.route"


async def _send_error(send: Send, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
    body = json.dumps(error_body(code, message)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": ERROR_CODES[code][0], "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class _HttpMiddleware(ABC):
    """A middleware of HTTP requests: every other scope (lifespan), and the requests it does not
    apply to, pass straight to the inner app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.applies_to(scope):
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def applies_to(self, scope: Scope) -> bool:
        """Whether this HTTP request goes through :meth:`handle` (every one unless narrowed)."""
        return True

    @abstractmethod
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer an HTTP request this middleware applies to (usually by calling the inner app)."""


class AdmissionControl(_HttpMiddleware):
    """``overloaded`` (429 + Retry-After) for guarded requests past the in-flight limit,
    answered from the headers alone: the body is never read. The slot is released when the
    inner app returns or raises, whatever the outcome (answer, error, client gone)."""

    def __init__(self, app: ASGIApp, admission: Admission, routes: frozenset[tuple[str, str]]) -> None:
        super().__init__(app)
        self.admission = admission
        self.routes = routes  # (method, path) pairs, e.g. ("POST", "/v1/pose")

    def applies_to(self, scope: Scope) -> bool:
        return (scope.get("method", ""), scope.get("path", "")) in self.routes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.admission.try_acquire("rest"):
            scope[ROUTE_KEY] = scope["path"]  # no routing happened; label the metrics by the guarded path
            error = self.admission.overloaded()
            await _send_error(send, error.code, error.message, error.headers)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.release()


class BodySizeLimit(_HttpMiddleware):
    """Answer 413 ``too_large`` for bodies over ``max_bytes`` (``path_limits``: another limit for a path,
    e.g. the video upload's)."""

    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes
        self.path_limits = dict(path_limits or {})

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.path_limits.get(scope.get("path", ""), self.max_bytes)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = 0
                if length > limit:
                    await _send_error(send, "too_large", f"body of {length} bytes; the limit is {limit}")
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ServiceError("too_large", f"body over the limit of {limit} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except ServiceError as exc:  # raised by limited_receive outside the app's handlers
            if started or exc.code != "too_large":
                raise
            await _send_error(send, exc.code, exc.message)


class RequestMetrics(_HttpMiddleware):
    """Count requests and time them by route template and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or scope.get(ROUTE_KEY) or "unmatched"
            self.metrics.observe_request(scope.get("method", "GET"), path, status, time.perf_counter() - started)
