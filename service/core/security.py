"""The one API-key check: REST (``X-API-Key`` header) and gRPC (``x-api-key`` metadata) both call it.

Each transport reads the key where its clients send it and answers a refusal its own way (HTTP
401, gRPC UNAUTHENTICATED); the comparison itself is here, constant-time, once.
"""

from __future__ import annotations

import hmac


def api_key_accepted(expected: str | None, presented: str | None) -> bool:
    """Whether a request presenting ``presented`` may pass: always without a configured key
    (``expected`` None), else only with the same key (compared in constant time)."""
    if expected is None:
        return True
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())
