"""The one API-key check both transports call (REST maps a refusal to 401, gRPC to UNAUTHENTICATED)."""

from __future__ import annotations

from ditepose.service.core.security import api_key_accepted


def test_without_a_configured_key_every_request_passes() -> None:
    assert api_key_accepted(None, None) and api_key_accepted(None, "anything")


def test_with_a_key_only_the_same_key_passes() -> None:
    assert api_key_accepted("s3cret", "s3cret")
    assert not api_key_accepted("s3cret", None)
    assert not api_key_accepted("s3cret", "s3cre")
    assert not api_key_accepted("s3cret", "S3CRET")
