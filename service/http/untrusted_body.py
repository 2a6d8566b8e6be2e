"""JSON request bodies that FastAPI validates, parsed by :mod:`~ditepose.service.core.untrusted_json`.

FastAPI reads a body model's JSON with ``json.loads`` (through ``Request.json``): hostile nesting
raised ``RecursionError`` there and came back as a bare 400 "There was an error parsing the body".
A router built with ``route_class=UntrustedJsonRoute`` parses a JSON body first with pydantic's
parser and the limits of :func:`read_json` (a 422 ``invalid_request`` naming ``body``), then hands
FastAPI the parsed value, so the body model, its OpenAPI schema and its validation messages stay
FastAPI's.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from email.message import Message
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import JsonValue

from ditepose.service.core.untrusted_json import ANY_JSON, read_json

# A job request is a handful of names and numbers; 64 KiB is generous.
MAX_JSON_BODY_BYTES = 64 * 1024


class UntrustedJsonRequest(Request):
    """A request whose ``json()`` is pydantic's parser with a size and depth limit."""

    max_json_bytes = MAX_JSON_BODY_BYTES

    async def json(self) -> JsonValue:
        if not hasattr(self, "_json"):
            self._json = read_json(await self.body(), ANY_JSON, field="body", max_bytes=self.max_json_bytes)
        return self._json


def declares_json(request: Request) -> bool:
    """What FastAPI parses as JSON: no content type, ``application/json`` or ``application/*+json``."""
    content_type = request.headers.get("content-type")
    if not content_type:
        return True
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


class UntrustedJsonRoute(APIRoute):
    """Parse a JSON body before FastAPI does, so a hostile one is our 422, not FastAPI's 400."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_then_handle(request: Request) -> Response:
            untrusted = UntrustedJsonRequest(request.scope, request.receive)
            if declares_json(untrusted) and await untrusted.body():
                await untrusted.json()  # raises ServiceError (422) outside FastAPI's catch-all
            return await handler(untrusted)

        return parse_then_handle
