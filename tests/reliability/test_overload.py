"""Overload: 64 concurrent loopback clients against a small queue. The service sheds with 429 fast,
memory stays bounded, nothing outlives its deadline, and latency is back to normal afterwards."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.reliability.support import process_rss_mb, record, server_process
from tests.service.conftest import encode, figure_image

CLIENTS = 64
DURATION_S = 8.0
TIMEOUT_S = 5.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _load(url: str, image: bytes, duration_s: float, pid: int) -> tuple[Counter, dict[int, list[float]], list[float]]:
    codes: Counter[int] = Counter()
    latency: dict[int, list[float]] = {}
    rss: list[float] = []
    stop_at = time.monotonic() + duration_s
    files = {"image": ("a.jpg", image, "image/jpeg")}

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                response = await client.post("/v1/pose", files=files, data={"boxes": "[[40,10,80,100]]"})
                code = response.status_code
            except httpx.TimeoutException:
                code = -1  # a hang past the deadline + margin
            codes[code] += 1
            latency.setdefault(code, []).append(time.perf_counter() - started)
            if code == 429:
                await asyncio.sleep(0.01)

    async def sample_rss() -> None:
        while time.monotonic() < stop_at:
            rss.append(process_rss_mb(pid))
            await asyncio.sleep(0.25)

    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S + 10, limits=limits) as client:
        await asyncio.gather(sample_rss(), *(client_loop(client) for _ in range(CLIENTS)))
    return codes, latency, rss


def _sequential_latency(client: httpx.Client, image: bytes, n: int = 15) -> float:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        response = client.post("/v1/pose", files={"image": ("a.jpg", image, "image/jpeg")},
                               data={"boxes": "[[40,10,80,100]]"})
        assert response.status_code == 200, response.text
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def test_overload_sheds_fast_and_recovers(tiny_ckpt: Path, tmp_path: Path) -> None:
    """The server is a real `ditepose serve` process, so its RSS and latencies are its own."""
    image = encode(figure_image(160, 120))
    with server_process(tiny_ckpt, tmp_path / "server.log", queue_size=8, max_batch_size=4, max_delay_ms=2,
                        request_timeout_s=TIMEOUT_S) as (url, proc), httpx.Client(base_url=url, timeout=30) as client:
        before = _sequential_latency(client, image)
        rss_before = process_rss_mb(proc.pid)
        codes, latency, rss = asyncio.run(_load(url, image, DURATION_S, proc.pid))
        after = _sequential_latency(client, image)
        ready = client.get("/readyz").json()
        assert ready["ready"], ready
        depth_after = sum(ready["queue_depth"].values())
    total = sum(codes.values())
    assert set(codes) <= {200, 429, 503, 504}, codes
    assert codes[429] > 0 and codes[200] > 0, codes
    slowest = max(max(v) for v in latency.values())
    assert slowest < TIMEOUT_S + 3.0, f"a request took {slowest:.1f} s (deadline {TIMEOUT_S} s)"
    shed_p50, served_p50 = pct(latency[429], 0.5), pct(latency[200], 0.5)
    assert shed_p50 < served_p50, (shed_p50, served_p50)
    assert max(rss) - rss_before < 300, (rss_before, max(rss))
    assert after < 3 * before + 0.05, (before, after)
    assert depth_after == 0
    record("overload", f"{CLIENTS} concurrent clients x {DURATION_S:g} s, queue_size 8 crops", cases=total,
           requests_lost=0, served=codes[200], shed_429=codes[429], other=total - codes[200] - codes[429],
           throughput_rps=round(codes[200] / DURATION_S, 1),
           served_p50_ms=round(served_p50 * 1000, 1), served_p99_ms=round(pct(latency[200], 0.99) * 1000, 1),
           shed_p50_ms=round(shed_p50 * 1000, 1), shed_p99_ms=round(pct(latency[429], 0.99) * 1000, 1),
           slowest_ms=round(slowest * 1000, 1), rss_before_mb=round(rss_before, 1), rss_max_mb=round(max(rss), 1),
           idle_latency_before_ms=round(before * 1000, 1), idle_latency_after_ms=round(after * 1000, 1),
           detail="server: a `ditepose serve` process (REST+gRPC, 1 CPU worker); clients: 64 asyncio tasks in the test process")
