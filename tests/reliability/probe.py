"""A lone client in its own process: sequential ``POST /v1/pose`` requests, timed end to end.

``python -m tests.reliability.probe URL IMAGE DURATION_S [--interval S]`` prints one JSON object
``{"latency_s": {"200": [...], "429": [...]}}``. The overload test runs it beside its 64 load
tasks: the load tasks' own figures include their event loop's queueing, this one's do not (it
has its own interpreter and sends one request at a time), so it shows what a well-behaved client
sees from the overloaded server: connect, send, the server's queues and the answer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("image", type=Path)
    parser.add_argument("duration_s", type=float)
    parser.add_argument("--interval", type=float, default=0.05, help="pause between requests (s)")
    args = parser.parse_args(argv)
    files = {"image": ("a.jpg", args.image.read_bytes(), "image/jpeg")}
    latency: dict[str, list[float]] = {}
    stop_at = time.monotonic() + args.duration_s
    with httpx.Client(base_url=args.url, timeout=30) as client:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                code = str(client.post("/v1/pose", files=files, data={"boxes": "[[40,10,80,100]]"}).status_code)
            except httpx.TimeoutException:
                code = "timeout"
            latency.setdefault(code, []).append(time.perf_counter() - started)
            time.sleep(args.interval)
    print(json.dumps({"latency_s": latency}))


if __name__ == "__main__":
    main()
