"""Schemathesis against the LIVE OpenAPI schema of a real server: every operation, bounded cases.

Checks: no 5xx (``not_a_server_error``), every status code returned is one the operation documents
(``status_code_conformance``), and answers conform to the documented response schemas and content
types. The server runs the real pool with a tiny real model, the API key on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ditepose.service.core.settings import ModelSpec, Settings  # noqa: E402
from ditepose.service.http.app import create_app  # noqa: E402
from tests.reliability.support import record, serve  # noqa: E402

KEY = "fuzz-key-0123456789"
MAX_EXAMPLES = 50
CASES: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


@pytest.fixture(scope="module")
def live_url(tiny_ckpt: Path) -> Iterator[str]:
    settings = Settings(_env_file=None, models=[ModelSpec(name="tiny", checkpoint=tiny_ckpt)], devices="cpu",
                        grpc_enabled=False, max_delay_ms=1.0, api_key=KEY, max_boxes=4,
                        max_upload_bytes=256 * 1024)
    with serve(create_app(settings)) as url:
        yield url
    if CASES:
        record("hostile_input", "schemathesis: every OpenAPI operation (live schema)", cases=sum(CASES.values()),
               operations=len(CASES), server_errors=STATUSES.get(500, 0) + STATUSES.get(502, 0),
               detail=", ".join(f"{code}: {n}" for code, n in sorted(STATUSES.items())))


def test_every_operation_answers_as_documented(live_url: str) -> None:
    """Each operation of the served schema gets up to MAX_EXAMPLES generated requests (valid and
    schema-violating ones, schemathesis' default mix); none may end in 5xx, in a status the operation
    does not document, or in a body or content type the schema does not allow."""
    api = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 7, [op.label for op in operations]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=True)
        def run(case) -> None:
            response = case.call(base_url=live_url, headers={"X-API-Key": KEY}, timeout=30)
            CASES[case.operation.label] += 1
            STATUSES[response.status_code] += 1
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                     response_schema_conformance, content_type_conformance])

        run()
