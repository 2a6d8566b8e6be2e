"""Thin HTTP routers: each takes its services as typed dependencies (:mod:`ditepose.service.http.deps`)."""

from __future__ import annotations

from typing import Any

from ditepose.service.core.errors import ERROR_CODES
from ditepose.service.http.schemas import ErrorResponse


def error_responses(*codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the stable error ``codes`` a route can answer, grouped by status
    (so the documented statuses are exactly the ones the route returns; schemathesis checks it)."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(ERROR_CODES[code][0], []).append(code)
    out: dict[int | str, dict[str, Any]] = {}
    for status, names in sorted(by_status.items()):
        entry: dict[str, Any] = {"model": ErrorResponse, "description": "; ".join(
            f"`{name}`: {ERROR_CODES[name][1]}" for name in names)}
        if "overloaded" in names:
            entry["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                                "schema": {"type": "integer"}}}
        out[status] = entry
    return out
