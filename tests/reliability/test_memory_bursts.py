"""Memory under bursts at the admission limit stays within the stated budget (docs/operations.md "Memory").

A real ``ditepose serve`` on the embedded defaults (``make run``: the demo model, the default
detector) gets bursts of as many simultaneous ``POST /v1/pose`` without boxes on docs/riders.jpg
as it admits (``max_in_flight``). Every answer is 200 or an error with the JSON body: 429 or 503
(shed), or 504 (its deadline passed in the queues: on 2 cores most of a burst of 288 does), the
service stays ready, and once the queues drain its resident memory settles back to at most
:data:`GROWTH_BOUND_MIB` over its idle RSS. No timing is asserted: the wait for the settled RSS is
a bound on how long to look, and a memory figure that never settles fails with what it read.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections import Counter
from pathlib import Path

import httpx
import pytest

from ditepose.service.core.settings import Settings
from tests.conftest import REPO_ROOT, python_cmd, subprocess_env
from tests.reliability.support import assert_error_shape, record
from tests.support import free_port, wait_until

# The growth over idle a replica's memory request covers (docs/operations.md states the same number).
GROWTH_BOUND_MIB = 600
BURSTS = 2
RIDERS = REPO_ROOT / "docs" / "riders.jpg"

pytestmark = pytest.mark.slow


def tree_rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants (VmRSS), MiB."""
    total, queue = 0, [pid]
    while queue:
        current = queue.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                queue.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue  # exited meanwhile
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return total / 1024


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


async def _burst(base: str, image: bytes, concurrency: int) -> Counter[int]:
    """``concurrency`` requests at once; each answer's shape is checked as it comes."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        async def one() -> int:
            response = await client.post("/v1/pose", files={"image": ("riders.jpg", image, "image/jpeg")})
            assert response.status_code in (200, 429, 503, 504), response.text
            if response.status_code == 200:
                assert isinstance(response.json()["persons"], list)
            else:
                assert_error_shape(response)
            return response.status_code

        return Counter(await asyncio.gather(*(one() for _ in range(concurrency))))


def test_bursts_at_the_admission_limit_settle_within_the_memory_budget(tmp_path: Path) -> None:
    concurrency = Settings().resolved_max_in_flight  # what the server, with this environment, admits
    port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(python_cmd("serve", "--port", str(port), "--grpc-port", str(grpc_port)),
                                cwd=REPO_ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _ready(base), timeout=300, what="the server to be ready",
                   gave_up=lambda: f"exited {proc.returncode}" if proc.poll() is not None else None,
                   on_timeout=lambda: log_path.read_text()[-2000:])
        idle = tree_rss_mib(proc.pid)
        image = RIDERS.read_bytes()
        codes: Counter[int] = Counter()
        for _ in range(BURSTS):
            codes += asyncio.run(_burst(base, image, concurrency))
        assert codes[200] > 0, codes
        assert _ready(base)
        settled = wait_until(lambda: (rss := tree_rss_mib(proc.pid)) - idle <= GROWTH_BOUND_MIB and rss,
                             timeout=120, what=f"RSS to settle within {GROWTH_BOUND_MIB} MiB of idle ({idle:.0f})",
                             on_timeout=lambda: f"RSS now {tree_rss_mib(proc.pid):.0f} MiB")
        record("overload", "memory after bursts at the admission limit", bursts=BURSTS, concurrency=concurrency,
               codes=dict(codes), idle_rss_mib=round(idle), settled_rss_mib=round(settled),
               growth_mib=round(settled - idle), bound_mib=GROWTH_BOUND_MIB)
        assert "Traceback" not in log_path.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()
