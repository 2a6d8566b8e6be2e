"""Helpers for the gRPC tests: a real pool + REST app + gRPC server on loopback ports.

Streaming tests use a tiny checkpoint (Dite-HRNet-18, 64x64 input, random weights saved in
our format) so hundreds of frames run in seconds on 2 CPU cores; the parity test uses the
reference checkpoint at the paper's 256x192.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import grpc
import numpy as np
import torch

from ditepose import model as models
from ditepose.proto.ditepose.v1 import pose_pb2, pose_pb2_grpc
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.serving import Serving
from ditepose.service.core.settings import ModelSpec, Settings
from ditepose.service.grpc.server import GrpcServer, start_grpc_server
from ditepose.service.http.app import create_app


def tiny_checkpoint(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    torch.manual_seed(0)
    module = models.build_model("dite_hrnet_18", num_joints=17).eval()
    meta = models.CheckpointMeta(arch="dite_hrnet_18", dataset="coco", num_joints=17, input_size=size)
    models.save_checkpoint(path, module, meta)
    return path


def make_settings(checkpoint: Path, name: str = "tiny", **overrides) -> Settings:
    base = {"grpc_port": 0, "port": 0, "max_delay_ms": 2.0, "devices": "cpu"}
    base.update(overrides)
    return Settings(_env_file=None, models=[ModelSpec(name=name, checkpoint=checkpoint)], **base)


@contextmanager
def running_services(
    settings: Settings, wrap_infer: Callable | None = None
) -> Iterator[tuple[WorkerPool, object, GrpcServer]]:
    """Pool + REST app (in-process ASGI) + gRPC server, sharing the pool and the PoseService.

    ``wrap_infer(infer) -> infer`` lets a test slow the workers down (said in that test).
    """
    factory = None
    if wrap_infer is not None:
        from ditepose.service.batching.infer import make_infer

        def factory(m, device):  # type: ignore[no-redef]
            return wrap_infer(make_infer(m.module, device, settings.precision))

    from ditepose.service.core.model_loader import load_models_isolated

    pool = WorkerPool(
        load_models_isolated(settings.models)[0],
        settings.resolved_devices(),
        max_batch_size=settings.max_batch_size,
        max_delay_ms=settings.max_delay_ms,
        queue_size=settings.queue_size,
        timeout_s=settings.request_timeout_s,
        infer_factory=factory,
    ).start()
    serving = Serving.create(settings)
    service = serving.attach(pool)
    app = create_app(settings, serving)
    server = start_grpc_server(settings, service)
    try:
        yield pool, app, server
    finally:
        server.stop(grace=1.0)
        pool.stop()


@contextmanager
def tiny_services(folder: Path, **overrides) -> Iterator[tuple[WorkerPool, object, GrpcServer, grpc.Channel]]:
    """:func:`running_services` of a fresh :func:`tiny_checkpoint` (written to ``folder``), with
    :func:`make_settings` ``overrides``; yields (pool, app, server, a channel to the server)."""
    settings = make_settings(tiny_checkpoint(folder / "tiny.pth"), **overrides)
    with running_services(settings) as (pool, app, server), channel(server) as ch:
        yield pool, app, server, ch


def channel(server: GrpcServer) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{server.port}")


def stub(ch: grpc.Channel) -> pose_pb2_grpc.PoseServiceStub:
    return pose_pb2_grpc.PoseServiceStub(ch)


LIMBS = ((0, 1), (1, 2), (1, 3), (3, 4), (1, 5), (5, 6), (2, 7), (7, 8), (2, 9), (9, 10))


def figure_frame(t: float, width: int = 320, height: int = 240, x0: float = 40.0, speed: float = 8.0) -> tuple[np.ndarray, list[float]]:
    """An articulated stick figure walking right (swinging limbs) and its box [x, y, w, h]."""
    img = np.full((height, width, 3), 200, np.uint8)
    cx = x0 + speed * t
    swing = 25 * math.sin(t * 0.6)
    pts = {
        0: (cx, 40), 1: (cx, 70), 2: (cx, 140),
        3: (cx - 20 + swing * 0.3, 100), 4: (cx - 30 + swing, 130),
        5: (cx + 20 - swing * 0.3, 100), 6: (cx + 30 - swing, 130),
        7: (cx - 12 + swing * 0.5, 180), 8: (cx - 15 + swing, 220),
        9: (cx + 12 - swing * 0.5, 180), 10: (cx + 15 - swing, 220),
    }
    cv2.circle(img, (int(cx), 40), 15, (220, 170, 140), -1)
    for a, b in LIMBS:
        pa = tuple(int(v) for v in pts[a])
        pb = tuple(int(v) for v in pts[b])
        cv2.line(img, pa, pb, (40, 40, 160), 7)
    xs = [p[0] for p in pts.values()]
    box = [min(xs) - 20, 15.0, max(xs) - min(xs) + 40, 220.0]
    return img, box


def jpeg(img_rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def frame_message(seq: int, img: np.ndarray, boxes: list[list[float]] | None = None, fps: float = 30.0) -> pose_pb2.StreamRequest:
    frame = pose_pb2.Frame(sequence_number=seq, timestamp=seq / fps, image=jpeg(img))
    for b in boxes or []:
        frame.boxes.add(x=b[0], y=b[1], width=b[2], height=b[3])
    return pose_pb2.StreamRequest(frame=frame)


def config_message(**fields) -> pose_pb2.StreamRequest:
    return pose_pb2.StreamRequest(config=pose_pb2.StreamConfig(**fields))
