"""A client that hangs up before its request body arrived: a metric and an INFO line, not an error.

Starlette raises :class:`~starlette.requests.ClientDisconnect` from the body read (``request.form()``,
``request.body()``) when the connection closes mid-body. Left to the catch-all handler it was
logged at ERROR with a full traceback ("unhandled error on POST /v1/pose"), and Starlette's
``ServerErrorMiddleware`` re-raised it for uvicorn to log a second traceback. A gone client is
routine for a public service, so it gets its own handler (handlers of specific exception classes
run in the inner ``ExceptionMiddleware``, which does not re-raise): it counts
``ditepose_client_disconnects_total{route}``, logs one INFO line and answers 499 (nginx's "client
closed request"; nobody reads it, the request metrics record it). Every other unexpected error
keeps the catch-all handler and its traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import Scope

log = logging.getLogger(__name__)

# Not an HTTP status anyone receives: the label the request metrics show for a hung-up client.
CLIENT_CLOSED_REQUEST = 499


def route_of(scope: Scope) -> str:
    """The route template of a request (``/v1/jobs/{job_id}``), or ``unmatched``."""
    route = scope.get("route")
    return route.path if isinstance(route, Route) else "unmatched"


class ClientDisconnects:
    """``ditepose_client_disconnects_total{route}`` in an app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counter = Counter(
            "ditepose_client_disconnects", "Requests whose client hung up before the body arrived", ["route"],
            registry=registry,
        )

    def observe(self, route: str) -> None:
        self.counter.labels(route).inc()


def install_disconnect_handler(app: FastAPI, registry: CollectorRegistry) -> ClientDisconnects:
    """Count and log client disconnects of ``app`` (metrics in ``registry``) instead of a traceback."""
    disconnects = ClientDisconnects(registry)

    async def client_gone(request: Request, exc: Exception) -> Response:
        route = route_of(request.scope)
        disconnects.observe(route)
        client = f"{request.client.host}:{request.client.port}" if request.client else "unknown client"
        log.info("client %s disconnected before the body of %s %s arrived", client, request.method, route)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    app.add_exception_handler(ClientDisconnect, client_gone)
    return disconnects
