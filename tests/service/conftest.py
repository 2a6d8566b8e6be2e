"""Real servers for the service tests: uvicorn on a loopback port, the real pool and model."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import uvicorn

from ditepose.service.core.settings import ModelSpec, Settings
from ditepose.service.http.app import create_app
from ditepose.service.http.deps import context_of

COCO_IMAGE = "000000217285.jpg"  # 640x427, several people
COCO_BOXES = [[261.96, 162.16, 107.47, 252.37], [510.82, 168.47, 73.07, 258.53], [376.37, 210.25, 98.39, 212.07]]


class LiveServer:
    """uvicorn serving ``create_app(settings)`` in a thread, on a socket bound to a free port."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def pool(self):
        return context_of(self.app).pool

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)


def start_server(**overrides) -> LiveServer:
    return LiveServer(Settings(_env_file=None, grpc_enabled=False, **overrides))


@pytest.fixture(scope="session")
def hrnet18_checkpoint(reference_dir: Path) -> Path:
    """The authors' layout with calibrated random weights: a real checkpoint, loadable everywhere."""
    return reference_dir / "dite_hrnet_18_coco_random.pth"


@pytest.fixture(scope="session")
def server(hrnet18_checkpoint: Path, reference_dir: Path) -> Iterator[LiveServer]:
    """The shared server: two models side by side, default batching settings."""
    models = [
        ModelSpec(name="hrnet18", checkpoint=hrnet18_checkpoint),
        ModelSpec(name="hrnet30_mpii", checkpoint=reference_dir / "dite_hrnet_30_mpii_random.pth"),
    ]
    with start_server(models=models, max_delay_ms=20, max_boxes=8) as live:
        yield live


@pytest.fixture(scope="session")
def coco_image_path(coco_mini: Path) -> Path:
    return coco_mini / "val2017" / COCO_IMAGE


@pytest.fixture(scope="session")
def coco_jpeg(coco_image_path: Path) -> bytes:
    return coco_image_path.read_bytes()


def figure_image(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """A stick figure on a plain background (RGB), drawn with OpenCV."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), rng.integers(150, 230), np.uint8)
    cx = width // 2 + int(rng.integers(-40, 40))
    cv2.circle(img, (cx, 90), 28, (220, 170, 140), -1)
    cv2.line(img, (cx, 120), (cx, 280), (40, 40, 160), 18)
    for dx in (-70, 70):
        cv2.line(img, (cx, 150), (cx + dx, 230), (40, 40, 160), 10)
        cv2.line(img, (cx, 280), (cx + dx // 2, 420), (30, 30, 30), 12)
    return img


def encode(img_rgb: np.ndarray, ext: str = ".jpg") -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def post_pose(client: httpx.Client, image: bytes, params: dict | None = None, **fields) -> httpx.Response:
    data = {k: json.dumps(v) if k == "boxes" else str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in fields.items()}
    return client.post("/v1/pose", files={"image": ("img.jpg", image, "image/jpeg")}, data=data, params=params)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body
