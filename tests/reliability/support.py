"""Helpers of the reliability suite: a live uvicorn for a given app, and the figures recorder.

Every test records what it tried (cases, load, faults, losses) with :func:`record`; the
session-finish hook in ``conftest.py`` writes them to ``test-artifacts/reliability.json`` and
``report.py`` renders ``docs/reliability.md`` from that file.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

RECORDS: list[dict[str, Any]] = []


def record(category: str, name: str, **figures: Any) -> None:
    """Add one row to the reliability table (category: hostile_input, overload, faults, security)."""
    RECORDS.append({"category": category, "name": name, **figures})


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """uvicorn serving ``app`` on a free loopback port in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def assert_error_shape(response: httpx.Response, status: int | None = None) -> dict:
    """A JSON ``{"error": {"code", "message"}}`` body, 4xx (or the given status)."""
    if status is not None:
        assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["message"], body
    return body


def wait_until(fn: Any, timeout: float = 30.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
