"""A client that hangs up mid-body is counted and logged at INFO without a traceback (a real uvicorn,
a raw socket that sends half a multipart body and closes); any other unexpected error keeps its
traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ditepose.service.core.settings import ModelSpec, Settings
from tests.reliability.server_log import RecordList, server_log
from tests.reliability.support import record, sample_delta, scrape, serve, wait_until
from tests.service.conftest import encode, figure_image, post_pose
from tests.service.grpc.support import running_services
from tests.service.http.raw_http import BOUNDARY, multipart_prefix, start_upload

DISCONNECTS = "ditepose_client_disconnects_total"
HANG_UPS = 3
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


@pytest.fixture(scope="module")
def live(tiny_ckpt: Path) -> Iterator[tuple[str, object, RecordList]]:
    settings = Settings(_env_file=None, models=[ModelSpec(name="tiny", checkpoint=tiny_ckpt)], devices="cpu",
                        grpc_port=0, port=0, max_delay_ms=1.0)
    with server_log() as log, running_services(settings) as (_, app, _server), serve(app) as url:
        yield url, app, log


def _hang_up_mid_body(url: str, path: str = "/v1/pose", content_type: str = MULTIPART) -> None:
    """Declare a 64 kB body, send its first kilobyte, close the socket."""
    start_upload(url, declared_bytes=64 * 1024, sent=multipart_prefix(), path=path, content_type=content_type).close()


def test_a_client_gone_mid_body_is_an_info_line_and_a_count(live: tuple) -> None:
    url, _, log = live
    before = scrape(url)
    for _ in range(HANG_UPS):
        _hang_up_mid_body(url)
    _hang_up_mid_body(url, "/v1/evaluate", "application/json")  # a FastAPI-validated body: the same path
    expected = {"/v1/pose": HANG_UPS, "/v1/evaluate": 1}

    def counted() -> bool:
        after = scrape(url)
        return all(sample_delta(before, after, DISCONNECTS, route=r) == n for r, n in expected.items())

    assert wait_until(counted, timeout=30), scrape(url)
    info = log.at(logging.INFO, "disconnected before the body")
    assert len(info) >= HANG_UPS + 1, [r.getMessage() for r in log.records]
    assert not log.tracebacks(), log.tracebacks()
    assert not [r for r in log.records if r.levelno >= logging.ERROR], [r.getMessage() for r in log.records]
    with httpx.Client(base_url=url, timeout=30) as client:  # the service is untouched
        assert client.get("/readyz").status_code == 200
        assert post_pose(client, encode(figure_image(160, 120)), boxes=[[40, 10, 80, 100]]).status_code == 200
    record("faults", "clients hang up mid-body", injected=HANG_UPS + 1, tracebacks=0,
           detail="counted in ditepose_client_disconnects_total{route}, one INFO line each")


def test_other_unexpected_errors_keep_their_traceback(live: tuple) -> None:
    """The disconnect handler is for ClientDisconnect alone: a genuine fault is still an ERROR with a traceback."""
    url, app, log = live

    @app.get("/test-only/boom")
    async def boom() -> None:
        raise RuntimeError("a genuine server fault")

    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.get("/test-only/boom")
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal"
    faults = [r for r in log.records if r.levelno >= logging.ERROR and r.exc_info]
    assert any("a genuine server fault" in str(r.exc_info[1]) for r in faults if r.exc_info), \
        [r.getMessage() for r in log.records]
    log.records.clear()
