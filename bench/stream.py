"""gRPC StreamPose throughput and per-frame latency, next to the bare engine at the same batch size.

``python -m bench.stream [--frames 60] [--streams 1 4] [--batch-size 8] [--quick]``

In one process: a worker pool + gRPC server on a loopback port, and 1 or N concurrent client
streams of synthetic 640x480 JPEG frames (one person box each, flip test off by default, so
one crop per frame). The engine row runs the pool's own infer callable on ready-made batches
of ``--batch-size`` crops: the ceiling the service can approach. Prints a table and writes
bench/results/stream.json. Client, server and workers share the machine's cores (and the GIL),
so this is the whole-system cost on one box, not the network's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # also run as a script: python bench/stream.py
    sys.path.insert(0, str(REPO_ROOT))

from bench.shared import shared_file  # noqa: E402


def write_report(path: Path, report: dict) -> int:
    """The bench's JSON report (folders made as needed); 0, the bench's exit status."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def _checkpoint(arg: str | None, tmp: Path, input_size: tuple[int, int]) -> Path:
    if arg:
        return Path(arg)
    ref = shared_file("fixtures", "reference", "dite_hrnet_18_coco_random.pth")
    if ref is not None and input_size == (192, 256):
        return ref
    from ditepose import model as models

    module = models.build_model("dite_hrnet_18", num_joints=17).eval()
    meta = models.CheckpointMeta(arch="dite_hrnet_18", dataset="coco", num_joints=17, input_size=input_size)
    path = tmp / "bench.pth"
    models.save_checkpoint(path, module, meta)
    return path


def _frames(count: int) -> list[tuple[bytes, list[float]]]:
    import cv2

    out = []
    for i in range(count):
        img = np.full((480, 640, 3), 190, np.uint8)
        cx = 100 + 4 * i
        cv2.circle(img, (cx, 90), 28, (140, 170, 220), -1)
        cv2.line(img, (cx, 120), (cx, 280), (160, 40, 40), 18)
        for dx in (-70, 70):
            cv2.line(img, (cx, 150), (cx + dx, 230), (160, 40, 40), 10)
            cv2.line(img, (cx, 280), (cx + dx // 2, 420), (30, 30, 30), 12)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        out.append((buf.tobytes(), [float(cx - 90), 50.0, 180.0, 390.0]))
    return out


def engine_throughput(infer, batch: int, crops: torch.Tensor, seconds: float) -> dict:
    """Forward passes of ``batch`` crops, repeated from ``crops`` (real ones: random inputs can run
    into denormals, which made one run of this row 60x slower than the next)."""
    x = crops[torch.arange(batch) % len(crops)].contiguous()
    for _ in range(2):
        infer(x)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        infer(x)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"batch": batch, "forward_ms": round(median * 1e3, 2), "crops_per_s": round(batch / median, 2)}


def run_streams(port: int, frames: list, streams: int, max_in_flight: int, flip: bool) -> dict:
    import grpc

    from ditepose.proto.ditepose.v1 import pose_pb2, pose_pb2_grpc

    latencies: list[float] = []
    server_ms: list[float] = []
    counts: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        sent: dict[int, float] = {}
        # The client keeps at most max_in_flight + 1 frames outstanding, so the latency measured
        # is the service's, not time spent in HTTP/2 buffers (the server's own backpressure would
        # otherwise let the transport window fill with frames).
        window = threading.Semaphore(max_in_flight + 1)

        def requests():
            yield pose_pb2.StreamRequest(config=pose_pb2.StreamConfig(
                options=pose_pb2.PoseOptions(flip_test=flip), max_in_flight=max_in_flight))
            for i, (data, box) in enumerate(frames):
                frame = pose_pb2.Frame(sequence_number=i, timestamp=i / 30.0, image=data)
                frame.boxes.add(x=box[0], y=box[1], width=box[2], height=box[3])
                window.acquire()
                sent[i] = time.perf_counter()
                yield pose_pb2.StreamRequest(frame=frame)

        mine, inside = [], []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            for result in pose_pb2_grpc.PoseServiceStub(ch).StreamPose(requests(), timeout=3600):
                assert not result.HasField("error"), result.error
                mine.append(time.perf_counter() - sent[result.sequence_number])
                inside.append(result.timings.total_ms)
                window.release()
        with lock:
            latencies.extend(mine)
            server_ms.extend(inside)
            counts.append(len(mine))

    threads = [threading.Thread(target=one) for _ in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1e3
    return {
        "streams": streams,
        "frames": int(sum(counts)),
        "wall_s": round(wall, 2),
        "frames_per_s": round(sum(counts) / wall, 2),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1),
        "latency_ms_p95": round(float(np.percentile(lat, 95)), 1),
        "latency_ms_mean": round(float(lat.mean()), 1),
        "server_total_ms_p50": round(float(np.percentile(server_ms, 50)), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60, help="frames per stream")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--batch-size", type=int, default=8, help="max_batch_size of the pool and the engine row")
    parser.add_argument("--max-in-flight", type=int, default=4, help="per stream")
    parser.add_argument("--flip", action="store_true", help="flip test on (2 crops per frame)")
    parser.add_argument("--input", default="192x256", help="network input WxH when no checkpoint is given")
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: the reference 256x192 HRNet-18)")
    parser.add_argument("--engine-seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="20 frames per stream, 3 s engine timing")
    parser.add_argument("--devices", default="cpu", help="the pool's devices setting ('cpu', 'cuda:0', 'auto', ...)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "stream.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.engine_seconds = 20, 3.0
    width, height = (int(v) for v in args.input.lower().split("x"))

    from ditepose.model.pipeline import TopDownPipeline
    from ditepose.service.core.images import decode_image
    from ditepose.service.core.serving import Serving, build_pool
    from ditepose.service.core.settings import ModelSpec, Settings
    from ditepose.service.grpc.server import start_grpc_server

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(args.checkpoint, Path(tmp), (width, height))
        settings = Settings(
            _env_file=None, models=[ModelSpec(name="bench", checkpoint=ckpt)], grpc_port=0, devices=args.devices,
            max_batch_size=args.batch_size, max_delay_ms=5.0, queue_size=4096,
        )
        served = build_pool(settings).start()
        pool = served.pool
        server = start_grpc_server(settings, Serving.create(settings).attach(pool, served.watcher))
        try:
            loaded = pool.models["bench"]
            worker = pool.workers[0]
            infer = worker.infers["bench"]
            frames = _frames(args.frames)
            run_streams(server.port, frames[: min(8, len(frames))], 1, args.max_in_flight, args.flip)  # warm-up
            rows = [run_streams(server.port, frames, n, args.max_in_flight, args.flip) for n in args.streams]
            data, box = frames[0]
            pipe = TopDownPipeline(loaded.input_size, loaded.spec, flip_test=args.flip)
            crops = pipe.prepare(decode_image(data, 10**8, 10**8), [[box[0], box[1], box[2], box[3]]]).crops
            engine = engine_throughput(infer, args.batch_size, crops, args.engine_seconds)
        finally:
            server.stop(1.0)
            served.stop()
    crops_per_frame = 2 if args.flip else 1
    report = {
        "what": "gRPC StreamPose frames/s and per-frame latency vs the bare engine at the same batch size",
        "model": {"arch": loaded.arch, "input_size": list(loaded.input_size), "checkpoint": str(ckpt)},
        "settings": {"max_batch_size": args.batch_size, "max_delay_ms": 5.0, "max_in_flight": args.max_in_flight,
                     "flip_test": args.flip, "frames_per_stream": args.frames, "image": "640x480 JPEG, 1 box"},
        "engine": {**engine, "frames_per_s_equivalent": round(engine["crops_per_s"] / crops_per_frame, 2)},
        "streams": rows,
        "devices": pool.devices,
        "gpu": torch.cuda.get_device_name(0) if any(d.startswith("cuda") for d in pool.devices) else None,
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
    }
    print(f"engine: batch {engine['batch']}: {engine['forward_ms']} ms/forward, {engine['crops_per_s']} crops/s "
          f"(= {report['engine']['frames_per_s_equivalent']} frames/s)")
    print(f"{'streams':>7} {'frames':>6} {'frames/s':>9} {'% engine':>8} {'p50 ms':>8} {'p95 ms':>8} {'server p50':>10}")
    for r in rows:
        share = 100.0 * r["frames_per_s"] / max(report["engine"]["frames_per_s_equivalent"], 1e-9)
        print(f"{r['streams']:>7} {r['frames']:>6} {r['frames_per_s']:>9.2f} {share:>7.0f}% "
              f"{r['latency_ms_p50']:>8.1f} {r['latency_ms_p95']:>8.1f} {r['server_total_ms_p50']:>10.1f}")
    return write_report(args.out, report)


if __name__ == "__main__":
    raise SystemExit(main())
