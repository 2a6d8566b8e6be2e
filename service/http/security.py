"""Optional API key on the /v1 routes (header ``X-API-Key``, constant-time comparison)."""

from __future__ import annotations

import hmac

from fastapi import Security
from fastapi.security import APIKeyHeader

from ditepose.service.core.errors import ServiceError
from ditepose.service.http.deps import ContextDep

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Needed only when the server has a key.")


async def require_api_key(context: ContextDep, key: str | None = Security(api_key_header)) -> None:
    expected = context.api_key
    if expected is None:
        return
    if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
        raise ServiceError("unauthorized", "missing or wrong X-API-Key header")
