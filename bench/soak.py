"""Bounded loopback soak: REST, gRPC streams and hostile inputs against one ``ditepose serve`` process.

``python -m bench.soak [--duration 300] [--rest-clients 4] [--streams 2] [--bad-clients 1] [--checkpoint PATH]``

Starts the real server (REST + gRPC, the default CPU worker layout) as a child process with a small random-weight
Dite-HRNet-18 (64x64 input unless ``--checkpoint``), drives it from client threads for
``--duration`` seconds and records throughput, latency percentiles per traffic kind, answers by
status code, and the server's RSS over time. gRPC frame latency is the gap between consecutive
results of a stream (frames are pipelined). Writes ``bench/results/soak.json``. Lost requests
(no answer, connection error or 5xx on a good request) are counted separately and should be zero.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.service_support import free_port, rss_mb, tree_memory_mb  # noqa: E402

BOX = "[[110,25,100,205]]"  # the figure of _images(), as the REST boxes field


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


class Tally:
    """Thread-safe counters: answers by (kind, code), latencies by kind, lost requests."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.codes: Counter[str] = Counter()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.lost: Counter[str] = Counter()

    def add(self, kind: str, code: str, seconds: float, lost: bool = False) -> None:
        with self.lock:
            self.codes[f"{kind}:{code}"] += 1
            self.latency[kind].append(seconds)
            if lost:
                self.lost[f"{kind}:{code}"] += 1


def _tiny_checkpoint(path: Path) -> Path:
    import torch

    from ditepose import model as models

    torch.manual_seed(0)
    meta = models.CheckpointMeta(arch="dite_hrnet_18", dataset="coco", num_joints=17, input_size=(64, 64))
    models.save_checkpoint(path, models.build_model("dite_hrnet_18", num_joints=17).eval(), meta)
    return path


def _images() -> tuple[bytes, list[bytes]]:
    import cv2
    import numpy as np

    img = np.full((240, 320, 3), 200, np.uint8)
    cv2.circle(img, (160, 50), 18, (220, 170, 140), -1)
    cv2.line(img, (160, 70), (160, 160), (40, 40, 160), 10)
    cv2.line(img, (160, 160), (130, 220), (30, 30, 30), 8)
    cv2.line(img, (160, 160), (190, 220), (30, 30, 30), 8)
    good = cv2.imencode(".jpg", img)[1].tobytes()
    bad = [b"", b"not an image at all", good[: len(good) // 2], b"\x89PNG\r\n\x1a\n" + b"\x00" * 64]
    return good, bad


@contextmanager
def _server(checkpoint: Path, log_path: Path, *, queue_size: int, timeout: float) -> Iterator[tuple[int, str, int]]:
    """``ditepose serve`` (REST + gRPC on free ports) until ready; yields (pid, REST base URL, gRPC port)."""
    import httpx

    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DITEPOSE_QUEUE_SIZE": str(queue_size),
           "DITEPOSE_REQUEST_TIMEOUT_S": str(timeout), "DITEPOSE_MAX_DELAY_MS": "2"}
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "ditepose", "serve", "--port", str(port), "--grpc-port",
                                   str(grpc_port), "--devices", "cpu", "--model", f"tiny={checkpoint}"],
                                  cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start; see {log_path}")
                time.sleep(0.2)
            yield server.pid, base, grpc_port
        finally:
            server.terminate()
            server.wait(timeout=30)


def _rest_client(base: str, tally: Tally, stop_at: float, *, data: list[bytes], kind: str, timeout: float,
                 pause: float | None) -> None:
    """POST /v1/pose with each of ``data`` in turn until ``stop_at``, counted as ``kind``.

    After a 429 the client sleeps 0.05 s, after any other answer ``pause`` s (None: not at all).
    """
    import httpx

    with httpx.Client(base_url=base, timeout=timeout) as client:
        i = 0
        while time.monotonic() < stop_at:
            image = data[i % len(data)]
            i += 1
            started = time.perf_counter()
            try:
                r = client.post("/v1/pose", files={"image": ("a.jpg", image, "image/jpeg")}, data={"boxes": BOX})
                code = str(r.status_code)
                lost = r.status_code >= 500 and r.status_code != 503
            except httpx.HTTPError as exc:
                code, lost = type(exc).__name__, True
            tally.add(kind, code, time.perf_counter() - started, lost)
            if code == "429":
                time.sleep(0.05)
            elif pause is not None:
                time.sleep(pause)


def _stream_requests(good: bytes, bad: list[bytes], frames: int) -> Iterator:  # -> Iterator[StreamRequest]
    """A default StreamConfig, then ``frames`` frames of the figure with its box; every tenth is hostile."""
    from ditepose.proto.ditepose.v1 import pose_pb2

    yield pose_pb2.StreamRequest(config=pose_pb2.StreamConfig())
    for seq in range(frames):
        image = bad[seq % len(bad)] if seq % 10 == 9 else good
        frame = pose_pb2.Frame(sequence_number=seq, timestamp=seq / 30, image=image)
        frame.boxes.add(x=110, y=25, width=100, height=205)
        yield pose_pb2.StreamRequest(frame=frame)


def _stream_client(target: str, tally: Tally, stop_at: float, *, good: bytes, bad: list[bytes], frames: int,
                   timeout: float) -> None:
    """StreamPose calls of ``frames`` frames, one after another until ``stop_at``."""
    import grpc

    from ditepose.proto.ditepose.v1 import pose_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pose_pb2_grpc.PoseServiceStub(channel)
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            last = started
            try:
                for result in stub.StreamPose(_stream_requests(good, bad, frames), timeout=timeout * frames):
                    now = time.perf_counter()
                    code = result.error.code if result.HasField("error") else "ok"
                    tally.add("grpc_frame", code, now - last, lost=code in ("internal", "inference_failed"))
                    last = now
            except grpc.RpcError as exc:
                tally.add("grpc_stream", exc.code().name, time.perf_counter() - started,
                          lost=exc.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED,))


def _sample_rss(pid: int, t0: float, stop_at: float, every: float) -> list[tuple[float, float]]:
    """(seconds since ``t0``, RSS MiB of ``pid``) every ``every`` seconds until ``stop_at`` (monotonic clock)."""
    rss: list[tuple[float, float]] = []
    while time.monotonic() < stop_at:
        rss.append((round(time.monotonic() - t0, 1), round(rss_mb(pid), 1)))
        time.sleep(min(every, max(0.0, stop_at - time.monotonic())) or 0.01)
    return rss


def _report(config: dict, duration_s: float, tally: Tally, rss: list[tuple[float, float]], *, ready: bool,
            metrics_ok: bool, memory: dict[str, list[dict]]) -> dict:
    """The soak's JSON: answers by code, served/s and latency percentiles by kind, losses, RSS
    (the server's samples, and per process of its tree: RSS and peak RSS idle and after the load)."""
    kinds = sorted(tally.latency)
    served = {k: sum(v for c, v in tally.codes.items() if c.startswith(k + ":") and c.split(":")[1] in ("200", "ok"))
              for k in kinds}
    rss_values = [v for _, v in rss]
    return {
        "bench": "soak",
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform()},
        "config": config,
        "duration_s": duration_s,
        "answers_by_code": dict(sorted(tally.codes.items())),
        "served_per_s": {k: round(v / duration_s, 2) for k, v in served.items()},
        "latency_ms": {k: {"p50": _pct(tally.latency[k], 0.5), "p90": _pct(tally.latency[k], 0.9),
                           "p99": _pct(tally.latency[k], 0.99), "max": _pct(tally.latency[k], 1.0)} for k in kinds},
        "lost": dict(tally.lost),
        "lost_total": sum(tally.lost.values()),
        "rss_mb": {"start": rss_values[0] if rss_values else None, "max": max(rss_values, default=None),
                   "end": rss_values[-1] if rss_values else None, "samples": rss},
        "memory_mb": memory,
        "ready_after": ready,
        "metrics_ok_after": metrics_ok,
    }


def run(args: argparse.Namespace) -> dict:
    import httpx

    good, bad = _images()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else _tiny_checkpoint(tmp / "tiny.pth")
    log = tmp / "server.log"
    with _server(checkpoint, log, queue_size=args.queue_size, timeout=args.timeout) as (pid, base, grpc_port):
        tally = Tally()
        idle = tree_memory_mb(pid)
        stop_at = time.monotonic() + args.duration
        t0 = time.monotonic()
        rest = functools.partial(_rest_client, base, tally, stop_at, timeout=args.timeout + 10)
        stream = functools.partial(_stream_client, f"127.0.0.1:{grpc_port}", tally, stop_at, good=good, bad=bad,
                                   frames=args.frames_per_stream, timeout=args.timeout)
        clients = [functools.partial(rest, data=[good], kind="rest", pause=None)] * args.rest_clients
        clients += [functools.partial(rest, data=bad, kind="rest_bad", pause=args.bad_pause)] * args.bad_clients
        clients += [stream] * args.streams
        threads = [threading.Thread(target=client) for client in clients]
        for t in threads:
            t.start()
        rss = _sample_rss(pid, t0, stop_at, args.rss_every)
        for t in threads:
            t.join(args.timeout * args.frames_per_stream + 30)
        ready = bool(httpx.get(f"{base}/readyz", timeout=10).json().get("ready"))
        metrics_ok = httpx.get(f"{base}/metrics", timeout=10).status_code == 200
        memory = {"idle": idle, "after_load": tree_memory_mb(pid)}
    return _report(vars(args) | {"checkpoint": str(checkpoint)}, args.duration, tally, rss, ready=ready,
                   metrics_ok=metrics_ok, memory=memory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    parser.add_argument("--rest-clients", type=int, default=4)
    parser.add_argument("--bad-clients", type=int, default=1)
    parser.add_argument("--bad-pause", type=float, default=0.02, help="pause between hostile requests (s)")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--frames-per-stream", type=int, default=60)
    parser.add_argument("--queue-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=10.0, help="server request_timeout_s")
    parser.add_argument("--rss-every", type=float, default=5.0)
    parser.add_argument("--checkpoint", default=None, help="serve this checkpoint instead of a tiny random one")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "soak.json"))
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k not in ("rss_mb", "machine", "config")}
    summary["rss_mb"] = {k: v for k, v in result["rss_mb"].items() if k != "samples"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
