"""Optional API key on the /v1 routes (header ``X-API-Key``; the check is :mod:`ditepose.service.core.security`)."""

from __future__ import annotations

from fastapi import Security
from fastapi.security import APIKeyHeader

from ditepose.service.core.errors import ServiceError
from ditepose.service.core.security import api_key_accepted
from ditepose.service.http.deps import ContextDep

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Needed only when the server has a key.")


async def require_api_key(context: ContextDep, key: str | None = Security(api_key_header)) -> None:
    if not api_key_accepted(context.api_key, key):
        raise ServiceError("unauthorized", "missing or wrong X-API-Key header")
