"""Raw-socket HTTP/1.1 for tests that need what httpx won't do: send headers and only part of
a body, then read the answer (or hang up) while the rest is never sent."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

BOUNDARY = "ditepose-test-boundary"


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed_s: float = field(default=0.0)


def start_upload(
    base_url: str, declared_bytes: int, sent: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}",
    path: str = "/v1/pose", extra_headers: dict[str, str] | None = None,
) -> socket.socket:
    """Open a connection and send a POST whose Content-Length is ``declared_bytes`` but of
    whose body only ``sent`` goes out; the caller keeps (and eventually closes) the socket."""
    parts = urlsplit(base_url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    headers = {"Host": f"{parts.hostname}:{parts.port}", "Content-Type": content_type,
               "Content-Length": str(declared_bytes), **(extra_headers or {})}
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode("latin-1") + sent)
    return sock


def multipart_prefix(filename: str = "a.jpg") -> bytes:
    """The opening of a multipart body with an ``image`` part, up to the first file bytes."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff\xd8\xff\xe0" + b"\x00" * 1000


def read_response(sock: socket.socket, timeout: float = 30.0) -> RawResponse:
    """Read one answer with a Content-Length body from ``sock``."""
    started = time.perf_counter()
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawResponse(status, headers, body[:length], time.perf_counter() - started)
