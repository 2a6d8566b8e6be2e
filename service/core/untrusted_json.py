"""The one way to read JSON that a client sent: pydantic's parser, with a size and a depth limit.

``json.loads`` recurses in Python: a ``boxes`` string of 5000 ``[`` raised ``RecursionError``
inside the handler and answered 500 with a traceback. pydantic-core's parser (jiter, behind
``TypeAdapter.validate_json``) is iterative and refuses nesting past its own recursion limit
(about 200 levels) with a ``json_invalid`` error ("recursion limit exceeded"), so no input can
reach Python's stack. On top of that every caller states how many bytes and how many levels its
field may hold; anything past them, and any syntax or type error, becomes a :class:`ServiceError`
whose message names the field (``invalid_request``, or the code the caller gives, e.g.
``bad_boxes``). The raw input never goes into the message: it may be megabytes of garbage.

No transport is imported here: REST, gRPC and jobs can all use it.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import JsonValue, TypeAdapter, ValidationError

from ditepose.service.core.errors import ServiceError

T = TypeVar("T")

# Deeper than any field of the API needs (boxes: 2 levels, a request body: 3); far below
# pydantic-core's parser limit, so the depth error names our limit, not the parser's.
DEFAULT_MAX_DEPTH = 32
MAX_ERRORS_SHOWN = 5

ANY_JSON: TypeAdapter[JsonValue] = TypeAdapter(JsonValue)
JSON_OBJECT: TypeAdapter[dict[str, JsonValue]] = TypeAdapter(dict[str, JsonValue])


def read_json(
    raw: bytes | str,
    adapter: TypeAdapter[T],
    *,
    field: str,
    max_bytes: int,
    max_depth: int = DEFAULT_MAX_DEPTH,
    code: str = "invalid_request",
) -> T:
    """Parse and validate ``raw`` (a client's JSON text) as ``adapter``'s type, or raise
    :class:`ServiceError` ``code`` naming ``field``: too large, not JSON, nested too deeply,
    or not of the expected shape."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise ServiceError(code, f"{field}: {size} bytes of JSON; the limit is {max_bytes}")
    try:
        value = adapter.validate_json(raw)
    except ValidationError as exc:
        raise ServiceError(code, describe(exc, field)) from None
    depth = nesting_depth(value)
    if depth > max_depth:
        raise ServiceError(code, f"{field}: JSON nested {depth} levels deep; the limit is {max_depth}")
    return value


def describe(exc: ValidationError, field: str) -> str:
    """The first errors of ``exc`` as ``field.loc: message`` (never the offending input)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:MAX_ERRORS_SHOWN]:
        where = ".".join([field, *(str(p) for p in error["loc"])])
        if error["type"] == "json_invalid":
            reason = str(error.get("ctx", {}).get("error", error["msg"]))
            if "recursion limit" in reason:
                reason = f"nested too deeply ({reason})"
            parts.append(f"{where}: not valid JSON: {reason}")
        else:
            parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts) or f"{field}: invalid JSON"


def nesting_depth(value: object) -> int:
    """Levels of lists and objects in a parsed JSON value (a scalar is 0), walked without
    recursion so the depth of the input cannot matter."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest
