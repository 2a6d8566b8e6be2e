"""Security: the API key (constant time, every /v1 route and gRPC method, never logged), body
limits enforced before reading, catalogue names only, non-root containers."""

from __future__ import annotations

import re
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from ditepose.proto.ditepose.v1 import pose_pb2
from ditepose.service.core.settings import ModelSpec, Settings
from tests.conftest import REPO_ROOT, python_cmd, subprocess_env
from tests.reliability.support import assert_error_shape, record, serve
from tests.service.conftest import encode, figure_image, post_pose
from tests.service.grpc.support import channel, config_message, running_services, stub
from tests.service.jobs.support import free_port, wait_for

KEY = "s3cret-Key-must-never-leak-7f3a9c"
USER_LINE = re.compile(r"^\s*USER\s+(\S+)", re.MULTILINE)
LIMIT = 256 * 1024  # max_upload_bytes; the body limit is 4/3 of it + 64 kB


@pytest.fixture(scope="module")
def services(tiny_ckpt: Path) -> Iterator[tuple]:
    s = Settings(_env_file=None, models=[ModelSpec(name="tiny", checkpoint=tiny_ckpt)], devices="cpu",
                 grpc_port=0, port=0, max_delay_ms=1.0, api_key=KEY, max_upload_bytes=LIMIT)
    with running_services(s) as (_pool, app, grpc_server), serve(app) as url:
        yield app, url, grpc_server


def test_key_is_compared_in_constant_time() -> None:
    """One check (core/security.py) compares in constant time; both transports call it and compare nothing."""
    check = (REPO_ROOT / "service/core/security.py").read_text()
    assert "hmac.compare_digest" in check
    for path in ("service/core/security.py", "service/http/security.py", "service/grpc/server.py"):
        source = (REPO_ROOT / path).read_text()
        assert not re.search(r"(key|api_key|presented)\s*[!=]=\s*(self\.)?(expected|api_key)", source), path
    for path in ("service/http/security.py", "service/grpc/server.py"):
        assert "api_key_accepted(" in (REPO_ROOT / path).read_text(), path


def test_every_v1_route_and_grpc_method_needs_the_key(services: tuple) -> None:
    _app, url, grpc_server = services
    paths = httpx.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    routes = [(method.upper(), path) for path, ops in paths.items() if path.startswith("/v1") for method in ops]
    assert {p for _, p in routes} >= {"/v1/pose", "/v1/models", "/v1/evaluate", "/v1/jobs", "/v1/jobs/{job_id}"}
    tried = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for method, path in routes:
            target = path.replace("{job_id}", "0123456789abcdef")
            for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY[:-1]}, {"X-API-Key": ""}):
                response = client.request(method, target, headers=headers, json={"dataset": "coco-val"})
                assert_error_shape(response, 401)
                assert response.json()["error"]["code"] == "unauthorized"
                tried += 1
        assert client.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes stay open
    calls = {
        "Estimate": lambda s, md: s.Estimate(pose_pb2.EstimateRequest(image=b"x"), metadata=md, timeout=10),
        "ListModels": lambda s, md: s.ListModels(pose_pb2.ListModelsRequest(), metadata=md, timeout=10),
        "StreamPose": lambda s, md: list(s.StreamPose(iter([config_message()]), metadata=md, timeout=10)),
    }
    with channel(grpc_server) as ch:
        for name, call in calls.items():
            for metadata in ((), (("x-api-key", "wrong"),)):
                with pytest.raises(grpc.RpcError) as info:
                    call(stub(ch), metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                tried += 1
        call_ok = stub(ch).ListModels(pose_pb2.ListModelsRequest(), metadata=(("x-api-key", KEY),), timeout=10)
        assert call_ok.models
    record("security", "API key on every /v1 route and gRPC method", cases=tried, breaches=0,
           detail=f"{len(routes)} REST operations x 4 bad keys, 3 gRPC methods x 2; all 401/UNAUTHENTICATED")


def _raw_request(port: int, head: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # little kernel buffering: count what was read
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(head.encode())
    return sock


def _read_status(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, data


def test_50mb_body_is_refused_before_it_is_read(services: tuple) -> None:
    _, url, _ = services
    port = int(url.rsplit(":", 1)[1])
    big = 50 * 1024 * 1024
    # Content-Length path: only the headers are sent; the 413 comes without the body.
    sock = _raw_request(port, f"POST /v1/pose HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
                              f"Content-Type: application/json\r\nContent-Length: {big}\r\n\r\n")
    status, data = _read_status(sock)
    sock.close()
    assert status == 413 and b"too_large" in data, data[:300]
    # Chunked path: stream chunks until the server answers; it must answer long before 50 MB.
    sock = _raw_request(port, f"POST /v1/pose HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
                              f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"a" * 65536
    sent, answered = 0, False
    try:
        while sent < big:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                answered = True
                break
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        answered = True
    status, data = _read_status(sock) if answered else (0, b"")
    sock.close()
    assert answered and sent < 16 * LIMIT, sent  # 4 MB of 50 MB, kernel buffers included
    if status:
        assert status == 413, data[:300]
    record("security", "request size limit before decoding (50 MB body)", cases=2, breaches=0,
           detail=f"Content-Length: 413 with 0 body bytes read; chunked: cut off after {sent // 1024} kB "
                  f"(limit {(LIMIT * 4 // 3 + 65536) // 1024} kB)")


TRAVERSAL = ["../../etc/passwd", "/etc/passwd", "..", "coco-val/../../x", "..\\..\\win.ini", "%2e%2e%2fetc",
             "coco-val\x00", "~root", "a/b"]


def test_evaluate_takes_catalogue_names_only(services: tuple) -> None:
    _, url, _ = services
    tried = 0
    with httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": KEY}) as client:
        for name in TRAVERSAL:
            for body in ({"dataset": name}, {"dataset": "coco-val", "checkpoint": name}):
                response = client.post("/v1/evaluate", json=body)
                assert response.status_code in (404, 422), (body, response.text)
                assert_error_shape(response)
                tried += 1
    record("security", "path traversal in /v1/evaluate names", cases=tried, breaches=0,
           detail="dataset and checkpoint names: all 404/422")


def test_key_from_file_never_appears_in_logs_bodies_or_metrics(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A real `ditepose serve` process with the key in a file, logging at info level."""
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    port, grpc_port = free_port(), free_port()
    env = subprocess_env() | {"DITEPOSE_API_KEY_FILE": str(key_file), "DITEPOSE_MAX_DELAY_MS": "1"}
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(python_cmd("serve", "--port", str(port), "--grpc-port", str(grpc_port),
                                           "--devices", "cpu", "--model", f"tiny={tiny_ckpt}"),
                                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        bodies: list[str] = []
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: _ready(base), timeout=120, what="ditepose serve")
            with httpx.Client(base_url=base, timeout=30) as client:
                for headers in ({"X-API-Key": KEY + "x"}, {"X-API-Key": KEY}, {}):
                    bodies.append(client.get("/v1/models", headers=headers).text)
                    bodies.append(post_pose(client, b"junk", ).text)
                    response = client.post("/v1/pose", headers=headers,
                                           files={"image": ("a.jpg", encode(figure_image(96, 96)), "image/jpeg")})
                    bodies.append(response.text)
                bodies.append(client.post("/v1/evaluate", headers={"X-API-Key": KEY}, json={"dataset": KEY}).text)
                bodies.append(client.get("/metrics").text)
                bodies.append(client.get("/readyz").text)
                bodies.append(client.get("/openapi.json").text)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    logs = log_path.read_text(errors="replace")
    assert "Uvicorn running" in logs or "DitePose REST" in logs, logs[-2000:]
    leaks = [b for b in bodies if KEY in b and "dataset" not in b]
    assert KEY not in logs, "the API key appears in the server log"
    assert not leaks, leaks[:1]
    record("security", "API key never in logs, error bodies, /metrics", cases=len(bodies), breaches=0,
           detail=f"{len(logs.splitlines())} log lines, {len(bodies)} bodies checked")


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_dockerfiles_run_as_non_root() -> None:
    dockerfiles = sorted((REPO_ROOT / "docker").glob("**/Dockerfile*"))
    assert dockerfiles, "no Dockerfile under docker/"
    final_users = {}
    for path in dockerfiles:
        users = USER_LINE.findall(path.read_text())
        assert users and users[-1] not in ("root", "0", "0:0"), f"{path} runs as root"
        final_users[path.name] = users[-1]
    record("security", "Dockerfiles run as non-root", cases=len(dockerfiles), breaches=0,
           detail=", ".join(f"{name}: USER {user}" for name, user in final_users.items()))


def test_wrong_key_answers_do_not_time_differently_by_prefix(services: tuple) -> None:
    """Sanity only (network noise dominates): a key sharing a long prefix is not slower to refuse."""
    _, url, _ = services
    with httpx.Client(base_url=url, timeout=30) as client:
        def median(key: str) -> float:
            samples = []
            for _ in range(15):
                started = time.perf_counter()
                client.get("/v1/models", headers={"X-API-Key": key})
                samples.append(time.perf_counter() - started)
            return sorted(samples)[len(samples) // 2]
        assert median(KEY[:-1] + "z") < 20 * median("z" * len(KEY)) + 0.05
