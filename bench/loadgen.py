"""A minimal asyncio HTTP/1.1 keep-alive load generator for ``POST /v1/pose``.

Why not httpx: on a 2-core machine the client shares the CPU with the service it measures.
httpx builds the multipart body and runs its whole request/response machinery per request
(a few ms of CPU each), which the service then cannot use; the figures would measure the
client as much as the server. Here the complete request (headers + multipart body) is built
once as bytes, each connection is opened before the clock starts and kept alive, and a
response is read as status line + headers + ``Content-Length`` body. Every response is still
validated (status 200, JSON parses, the expected number of persons with the expected number
of keypoints), so errors are counted honestly, and the server's own stage ``timings`` are
summed. The client's CPU time per request is measured too (``client_cpu_ms_per_req``).
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
import uuid
from dataclasses import dataclass, field

STAGES = ("decode_ms", "preprocess_ms", "inference_ms", "postprocess_ms", "total_ms")


def pose_request(host: str, port: int, jpeg: bytes, boxes: list[list[float]] | None, flip: bool) -> bytes:
    """The whole ``POST /v1/pose`` multipart request, ready to write to a socket (``boxes`` None: none
    sent, the server's detector finds the people)."""
    boundary = uuid.uuid4().hex
    parts = [
        (b'Content-Disposition: form-data; name="image"; filename="p.jpg"\r\nContent-Type: image/jpeg', jpeg),
        *([(b'Content-Disposition: form-data; name="boxes"', json.dumps(boxes).encode())] if boxes is not None else []),
        (b'Content-Disposition: form-data; name="flip_test"', b"true" if flip else b"false"),
    ]
    body = b"".join(b"--%s\r\n%s\r\n\r\n%s\r\n" % (boundary.encode(), head, data) for head, data in parts)
    body += b"--%s--\r\n" % boundary.encode()
    head = (
        f"POST /v1/pose HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nAccept: application/json\r\n\r\n"
    )
    return head.encode() + body


class ProtocolError(Exception):
    """The server answered something that is not a well-formed HTTP/1.1 response."""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep_alive) of one response with a ``Content-Length`` body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise ProtocolError(f"bad status line {lines[0][:80]!r}") from exc
    length, keep_alive = None, True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            keep_alive = False
        elif name == b"transfer-encoding":
            raise ProtocolError("chunked responses are not expected from /v1/pose")
    if length is None:
        raise ProtocolError("response without Content-Length")
    return status, await reader.readexactly(length), keep_alive


def check_pose_body(body: bytes, persons: int, keypoints: int) -> dict:
    """The parsed JSON answer; ``ProtocolError`` unless it holds the expected persons/keypoints."""
    answer = json.loads(body)
    found = answer.get("persons")
    if not isinstance(found, list) or len(found) != persons:
        raise ProtocolError(f"expected {persons} person(s), got {None if found is None else len(found)}")
    if any(len(p.get("keypoints", ())) != keypoints for p in found):
        raise ProtocolError(f"a person without {keypoints} keypoints")
    return answer


def _error_code(status: int, body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http_{status}"


@dataclass
class LevelResult:
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    stage_sums_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    wall_s: float = 0.0
    client_cpu_s: float = 0.0

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def merge(self, other: LevelResult) -> None:
        """Add another chunk of the same level."""
        self.latencies_s += other.latencies_s
        for code, count in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + count
        for stage, total in other.stage_sums_ms.items():
            self.stage_sums_ms[stage] += total
        self.wall_s += other.wall_s
        self.client_cpu_s += other.client_cpu_s


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_level(
    host: str, port: int, request: bytes, concurrency: int, requests: int,
    persons: int = 1, keypoints: int = 17, timeout_s: float = 120.0,
) -> LevelResult:
    """Send exactly ``requests`` requests over ``concurrency`` keep-alive connections."""
    result = LevelResult()
    remaining = requests
    conns = [await asyncio.open_connection(host, port) for _ in range(concurrency)]

    async def worker(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        nonlocal remaining
        reader, writer = conn
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                writer.write(request)
                status, body, keep_alive = await asyncio.wait_for(read_response(reader), timeout_s)
                if status != 200:
                    result.error(_error_code(status, body))
                else:
                    timings = check_pose_body(body, persons, keypoints)["timings"]
                    result.latencies_s.append(time.perf_counter() - started)
                    for stage in STAGES:
                        result.stage_sums_ms[stage] += timings[stage]
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ProtocolError, ValueError, KeyError) as exc:
                result.error(type(exc).__name__)
                keep_alive = False
            if not keep_alive:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
        writer.close()

    cpu, started = _cpu_s(), time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    result.wall_s = time.perf_counter() - started
    result.client_cpu_s = _cpu_s() - cpu
    return result
