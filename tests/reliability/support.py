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
from pathlib import Path
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


@contextmanager
def server_process(checkpoint: Any, log_path: Any, **settings: Any) -> Iterator[tuple[str, Any]]:
    """A real ``ditepose serve`` process (REST + gRPC) on free ports; yields (base URL, Popen).

    ``settings`` become ``DITEPOSE_*`` variables, e.g. ``queue_size=8``. The ``grpc_port``
    attribute of the Popen holds the gRPC port.
    """
    import subprocess

    from tests.conftest import REPO_ROOT, python_cmd, subprocess_env
    from tests.service.jobs.support import free_port

    port, grpc_port = free_port(), free_port()
    env = subprocess_env() | {f"DITEPOSE_{k.upper()}": str(v) for k, v in settings.items()}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(python_cmd("serve", "--port", str(port), "--grpc-port", str(grpc_port),
                                           "--devices", "cpu", "--model", f"tiny={checkpoint}"),
                                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        proc.grpc_port = grpc_port  # type: ignore[attr-defined]
        base = f"http://127.0.0.1:{port}"
        try:
            if not wait_until(lambda: proc.poll() is None and _ready(base), timeout=120, interval=0.2):
                raise RuntimeError(f"ditepose serve did not become ready: {Path(log_path).read_text()[-2000:]}")
            yield base, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                proc.kill()
                proc.wait()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``GET /metrics`` as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample_delta(before: dict, after: dict, name: str, **labels: str) -> float:
    """Growth of one counter sample between two :func:`scrape` results (0 when absent)."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def histogram_delta(before: dict, after: dict, name: str, **labels: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) buckets of one histogram series observed between two scrapes."""
    buckets = []
    for (sample, sample_labels), value in after.items():
        found = dict(sample_labels)
        if sample != f"{name}_bucket" or any(found.get(k) != v for k, v in labels.items()):
            continue
        le = found["le"]
        buckets.append((float(le), value - before.get((sample, sample_labels), 0.0)))
    return sorted(buckets)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The q-quantile of cumulative buckets as Prometheus' ``histogram_quantile`` computes it
    (linear within the bucket holding it; the last finite bound when it falls in +Inf)."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return float("nan")
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return lower_bound
