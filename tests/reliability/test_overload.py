"""Overload: 64 concurrent loopback clients against a small queue. The service sheds with 429 fast,
memory stays bounded, nothing outlives its deadline, and latency is back to normal afterwards.

Latency is measured twice: by the clients (which includes their own event loop's queueing: 64
tasks in this process, on the same 2 cores as the server) and by the server itself, from the
deltas of its ``ditepose_http_request_duration_seconds`` histogram on /metrics (time from the
request's headers reaching the app to its answer being sent)."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.service_support import rss_mb
from tests.conftest import REPO_ROOT, subprocess_env
from tests.reliability.support import (
    histogram_delta,
    histogram_quantile,
    record,
    sample_delta,
    scrape,
    server_process,
    wait_until,
)
from tests.service.conftest import encode, figure_image
from tests.service.http.raw_http import multipart_prefix, read_response, start_upload

CLIENTS = 64
DURATION_S = 8.0
TIMEOUT_S = 5.0
IN_FLIGHT_LIMIT = 6  # the default for these settings: (queue_size 8 + a batch of 4 crops) / 2 crops a request


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
            rss.append(rss_mb(pid))
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
    (tmp_path / "probe.jpg").write_bytes(image)
    with server_process(tiny_ckpt, tmp_path / "server.log", queue_size=8, max_batch_size=4, max_delay_ms=2,
                        request_timeout_s=TIMEOUT_S, max_in_flight=IN_FLIGHT_LIMIT) as (url, proc), httpx.Client(base_url=url, timeout=30) as client:
        before = _sequential_latency(client, image)
        rss_before = rss_mb(proc.pid)
        metrics_before = scrape(url)
        probe = subprocess.Popen([sys.executable, "-m", "tests.reliability.probe", url, str(tmp_path / "probe.jpg"),
                                  str(DURATION_S - 1)], cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                                 text=True)
        codes, latency, rss = asyncio.run(_load(url, image, DURATION_S, proc.pid))
        probe_out, _ = probe.communicate(timeout=60)
        metrics_after = scrape(url)
        after = _sequential_latency(client, image)
        ready = client.get("/readyz").json()
        assert ready["ready"], ready
        depth_after = sum(ready["queue_depth"].values())
    total = sum(codes.values())
    assert set(codes) <= {200, 429, 503, 504}, codes
    assert codes[429] > 0 and codes[200] > 0, codes
    # No request outlived its deadline by the client's margin: a hang would time the client out
    # (code -1, refused by the set above). The slowest answer is reported, not asserted: on a
    # 2-core machine the client's own event loop shares the cores with the overloaded server.
    slowest = max(max(v) for v in latency.values())
    print(f"slowest answer {slowest:.2f} s (server deadline {TIMEOUT_S} s, client timeout {TIMEOUT_S + 10} s)")
    shed_p50, served_p50 = pct(latency[429], 0.5), pct(latency[200], 0.5)
    assert shed_p50 < served_p50, (shed_p50, served_p50)
    assert max(rss) - rss_before < 300, (rss_before, max(rss))
    assert after < 3 * before + 0.05, (before, after)
    assert depth_after == 0

    # Server side: the same requests, timed by the server.
    lone = {int(k): v for k, v in json.loads(probe_out)["latency_s"].items()}  # the probe's own requests
    assert set(lone) <= {200, 429, 503, 504} and lone.get(429), lone
    hist = {code: histogram_delta(metrics_before, metrics_after, "ditepose_http_request_duration_seconds",
                                  method="POST", route="/v1/pose", status=str(code)) for code in (200, 429)}
    seen = {code: codes[code] + len(lone.get(code, [])) for code in (200, 429)}  # every request the server had
    assert hist[429][-1][1] == seen[429] and hist[200][-1][1] == seen[200], (hist, seen)
    server = {(code, q): histogram_quantile(q, hist[code]) for code in (200, 429) for q in (0.5, 0.99)}
    shed_early = sample_delta(metrics_before, metrics_after, "ditepose_admission_rejected_total", transport="rest")
    shed_queue = sample_delta(metrics_before, metrics_after, "ditepose_queue_rejected_total", model="tiny")
    assert shed_early + shed_queue == seen[429], (shed_early, shed_queue, seen)
    assert shed_early > shed_queue, (shed_early, shed_queue)  # most sheds never read a body
    # "At once", robust to machine speed: the median 429 costs the server a tenth of a served request
    # or less, and not one 429 (server side) took as long as the request deadline.
    assert server[429, 0.5] * 10 < server[200, 0.5], server
    assert pct(lone[429], 0.5) < server[200, 0.5], (lone, server)  # a lone client's 429 beats a served request
    within_deadline = next(count for bound, count in hist[429] if bound >= TIMEOUT_S)
    assert within_deadline == seen[429], hist[429]
    record("overload", f"{CLIENTS} concurrent clients x {DURATION_S:g} s, queue_size 8 crops", cases=total,
           requests_lost=0, served=codes[200], shed_429=codes[429], other=total - codes[200] - codes[429],
           shed_before_body=int(shed_early), shed_by_queue=int(shed_queue),
           throughput_rps=round(codes[200] / DURATION_S, 1),
           served_p50_ms=round(served_p50 * 1000, 1), served_p99_ms=round(pct(latency[200], 0.99) * 1000, 1),
           shed_p50_ms=round(shed_p50 * 1000, 1), shed_p99_ms=round(pct(latency[429], 0.99) * 1000, 1),
           lone_requests=sum(len(v) for v in lone.values()),
           lone_served_p50_ms=round(pct(lone.get(200, []), 0.5) * 1000, 1),
           lone_shed_p50_ms=round(pct(lone[429], 0.5) * 1000, 1),
           lone_shed_p99_ms=round(pct(lone[429], 0.99) * 1000, 1),
           server_served_p50_ms=round(server[200, 0.5] * 1000, 1),
           server_served_p99_ms=round(server[200, 0.99] * 1000, 1),
           server_shed_p50_ms=round(server[429, 0.5] * 1000, 2),
           server_shed_p99_ms=round(server[429, 0.99] * 1000, 2),
           slowest_ms=round(slowest * 1000, 1), rss_before_mb=round(rss_before, 1), rss_max_mb=round(max(rss), 1),
           idle_latency_before_ms=round(before * 1000, 1), idle_latency_after_ms=round(after * 1000, 1),
           load_average=_load_average(),
           detail="server: a `ditepose serve` process (REST+gRPC, default CPU workers, in-flight limit "
                  f"{IN_FLIGHT_LIMIT}); clients: {CLIENTS} asyncio tasks in the test process (served_*, shed_*: "
                  "include their own event-loop queueing) and one lone sequential client in its own process "
                  "(lone_*: connect to answer); server_*: the server's own histogram on /metrics, headers in "
                  "to answer out (Prometheus-style interpolation within buckets); served/shed_429 count the "
                  "load tasks' answers, shed_before_body/shed_by_queue the server's (lone client included)")


def _load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _gauge(url: str, name: str) -> float:
    return scrape(url).get((name, ()), float("nan"))


def test_full_server_sheds_unfinished_uploads_and_frees_slots_of_quitters(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A `ditepose serve` process with 2 slots: two uploads that never finish fill it; 20 more
    requests whose bodies are never sent (multipart and JSON) get 429 from their headers alone;
    then the two holders hang up mid-upload and the slots come back (the gauge reads 0 and a
    normal request is served)."""
    with server_process(tiny_ckpt, tmp_path / "server.log", max_in_flight=2) as (url, _proc):
        holders = [start_upload(url, 500_000, multipart_prefix()) for _ in range(2)]
        try:
            assert wait_until(lambda: _gauge(url, "ditepose_in_flight_requests") == 2, timeout=10)
            shed_s = []
            for i in range(20):
                kwargs = {"content_type": "application/json"} if i % 2 else {}
                started = time.perf_counter()
                sock = start_upload(url, 5_000_000, b'{"image": "' if i % 2 else multipart_prefix(), **kwargs)
                try:
                    answer = read_response(sock, timeout=TIMEOUT_S)
                finally:
                    sock.close()
                shed_s.append(time.perf_counter() - started)
                assert answer.status == 429 and answer.headers["retry-after"] == "1", answer
            assert _gauge(url, "ditepose_in_flight_requests") == 2
        finally:
            for sock in holders:
                sock.close()
        assert wait_until(lambda: _gauge(url, "ditepose_in_flight_requests") == 0, timeout=10)
        with httpx.Client(base_url=url, timeout=30) as client:
            served = client.post("/v1/pose", files={"image": ("a.jpg", encode(figure_image(160, 120)), "image/jpeg")},
                                 data={"boxes": "[[40,10,80,100]]"})
            assert served.status_code == 200, served.text
        rejected = scrape(url)[("ditepose_admission_rejected_total", (("transport", "rest"),))]
    assert rejected == 20
    record("overload", "full server: unfinished uploads shed, quitters' slots freed", cases=22, injected=2,
           requests_lost=0, shed_unsent_p50_ms=round(statistics.median(shed_s) * 1000, 2),
           shed_unsent_max_ms=round(max(shed_s) * 1000, 2), load_average=_load_average(),
           detail="2 slots held by uploads that never finish; 20 requests with bodies never sent got 429 "
                  "from their headers (timed by one raw-socket client, connect to answer); both holders hung "
                  "up mid-upload and the in-flight gauge went back to 0")
