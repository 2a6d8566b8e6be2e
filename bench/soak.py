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
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


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


def run(args: argparse.Namespace) -> dict:
    import grpc
    import httpx

    from ditepose.proto.ditepose.v1 import pose_pb2, pose_pb2_grpc

    good, bad = _images()
    box = "[[110,25,100,205]]"
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else _tiny_checkpoint(tmp / "tiny.pth")
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port, grpc_port = free_port(), free_port()
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT), "DITEPOSE_QUEUE_SIZE": str(args.queue_size),
           "DITEPOSE_REQUEST_TIMEOUT_S": str(args.timeout), "DITEPOSE_MAX_DELAY_MS": "2"}
    log_file = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "ditepose", "serve", "--port", str(port), "--grpc-port",
                               str(grpc_port), "--devices", "cpu", "--model", f"tiny={checkpoint}"],
                              cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start; see " + str(tmp / "server.log"))
        time.sleep(0.2)

    tally = Tally()
    stop_at = time.monotonic() + args.duration
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()

    def rest_client(bad_inputs: bool) -> None:
        kind = "rest_bad" if bad_inputs else "rest"
        with httpx.Client(base_url=base, timeout=args.timeout + 10) as client:
            i = 0
            while time.monotonic() < stop_at:
                data = bad[i % len(bad)] if bad_inputs else good
                i += 1
                started = time.perf_counter()
                try:
                    r = client.post("/v1/pose", files={"image": ("a.jpg", data, "image/jpeg")}, data={"boxes": box})
                    code = str(r.status_code)
                    lost = r.status_code >= 500 and r.status_code != 503
                except httpx.HTTPError as exc:
                    code, lost = type(exc).__name__, True
                tally.add(kind, code, time.perf_counter() - started, lost)
                if code == "429":
                    time.sleep(0.05)
                elif bad_inputs:
                    time.sleep(args.bad_pause)

    def stream_client() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pose_pb2_grpc.PoseServiceStub(channel)
            while time.monotonic() < stop_at:
                def frames():
                    yield pose_pb2.StreamRequest(config=pose_pb2.StreamConfig())
                    for seq in range(args.frames_per_stream):
                        frame = pose_pb2.Frame(sequence_number=seq, timestamp=seq / 30,
                                               image=bad[seq % len(bad)] if seq % 10 == 9 else good)
                        frame.boxes.add(x=110, y=25, width=100, height=205)
                        yield pose_pb2.StreamRequest(frame=frame)
                started = time.perf_counter()
                last = started
                try:
                    for result in stub.StreamPose(frames(), timeout=args.timeout * args.frames_per_stream):
                        now = time.perf_counter()
                        code = result.error.code if result.HasField("error") else "ok"
                        tally.add("grpc_frame", code, now - last, lost=code in ("internal", "inference_failed"))
                        last = now
                except grpc.RpcError as exc:
                    tally.add("grpc_stream", exc.code().name, time.perf_counter() - started,
                              lost=exc.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED,))

    threads = [threading.Thread(target=rest_client, args=(False,)) for _ in range(args.rest_clients)]
    threads += [threading.Thread(target=rest_client, args=(True,)) for _ in range(args.bad_clients)]
    threads += [threading.Thread(target=stream_client) for _ in range(args.streams)]
    for t in threads:
        t.start()
    while time.monotonic() < stop_at:
        rss.append((round(time.monotonic() - t0, 1), round(_rss_mb(server.pid), 1)))
        time.sleep(min(args.rss_every, max(0.0, stop_at - time.monotonic())) or 0.01)
    for t in threads:
        t.join(args.timeout * args.frames_per_stream + 30)
    ready = httpx.get(f"{base}/readyz", timeout=10).json()
    metrics_ok = httpx.get(f"{base}/metrics", timeout=10).status_code == 200
    server.terminate()
    server.wait(timeout=30)
    log_file.close()

    elapsed = args.duration
    kinds = sorted(tally.latency)
    served = {k: sum(v for c, v in tally.codes.items() if c.startswith(k + ":") and c.split(":")[1] in ("200", "ok"))
              for k in kinds}
    rss_values = [v for _, v in rss]
    return {
        "bench": "soak",
        "machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count(),
                    "platform": platform.platform()},
        "config": vars(args) | {"checkpoint": str(checkpoint)},
        "duration_s": elapsed,
        "answers_by_code": dict(sorted(tally.codes.items())),
        "served_per_s": {k: round(v / elapsed, 2) for k, v in served.items()},
        "latency_ms": {k: {"p50": _pct(tally.latency[k], 0.5), "p90": _pct(tally.latency[k], 0.9),
                           "p99": _pct(tally.latency[k], 0.99), "max": _pct(tally.latency[k], 1.0)} for k in kinds},
        "lost": dict(tally.lost),
        "lost_total": sum(tally.lost.values()),
        "rss_mb": {"start": rss_values[0] if rss_values else None, "max": max(rss_values, default=None),
                   "end": rss_values[-1] if rss_values else None, "samples": rss},
        "ready_after": bool(ready.get("ready")),
        "metrics_ok_after": metrics_ok,
    }


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
