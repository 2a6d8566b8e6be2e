"""Helpers of the hot-swap tests: a model repository of tiny checkpoints, a real uvicorn + gRPC
service serving from it, and steady REST and stream clients that record every answer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import torch

from ditepose import model as models
from ditepose.model.checkpoint import FORMAT
from ditepose.model.repository import publish_version
from ditepose.proto.ditepose.v1 import pose_pb2, pose_pb2_grpc
from ditepose.service.core.settings import Settings
from ditepose.service.grpc.server import GrpcServer, start_grpc_server
from ditepose.service.http.deps import context_of
from tests.service.conftest import LiveServer
from tests.service.grpc.support import figure_frame, jpeg

# A Dite-HRNet-18 shrunk to milliseconds per crop (the training tests' TINY), at 64x64.
TINY = {"num_modules": (1, 1, 1), "num_blocks": (1, 1, 1),
        "num_channels": ((16, 32), (16, 32, 64), (16, 32, 64, 128))}
SIZE = (64, 64)
API_KEY = "swap-secret"
HEADERS = {"X-API-Key": API_KEY}
METADATA = (("x-api-key", API_KEY),)


def tiny_module(seed: int, size: tuple[int, int] = SIZE) -> tuple[torch.nn.Module, models.CheckpointMeta]:
    torch.manual_seed(seed)
    module = models.build_model("dite_hrnet_18", num_joints=17, **TINY).eval()
    meta = models.CheckpointMeta(arch="dite_hrnet_18", dataset="coco", num_joints=17, input_size=size,
                                 overrides={k: [list(x) if isinstance(x, tuple) else x for x in v]
                                            for k, v in TINY.items()})
    return module, meta


def publish(model_dir: Path, seed: int, corrupt: str | None = None, size: tuple[int, int] = SIZE) -> int:
    """Publish a tiny checkpoint as the next version; ``corrupt``: 'nan' (NaN weights) or 'keys' (a
    renamed state-dict key), both complete, well-formed files that only the service's checks catch."""
    module, meta = tiny_module(seed, size)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if corrupt == "nan":
        for key, value in state.items():
            if value.is_floating_point() and key.endswith("weight"):
                value.fill_(float("nan"))
    elif corrupt == "keys":
        first = next(iter(state))
        state[first.replace(".", "_renamed.", 1)] = state.pop(first)

    def write(path: Path) -> None:
        torch.save({"format": FORMAT, "ditepose_meta": meta.to_dict(), "state_dict": state}, path)

    return publish_version(model_dir, write)


def repository_settings(repository: Path, **overrides) -> Settings:
    base = {"grpc_port": 0, "devices": "cpu", "workers_per_device": 1, "max_delay_ms": 2.0,
            "model_repository": repository, "repository_poll_s": 0.5, "api_key": API_KEY, "grpc_enabled": False}
    base.update(overrides)
    return Settings(_env_file=None, **base)


@contextmanager
def serving(settings: Settings) -> Iterator[tuple[LiveServer, GrpcServer]]:
    """Real uvicorn (the app owns the pool, built by core.serving.build_pool) + a real gRPC server on it."""
    with LiveServer(settings) as live:
        context = context_of(live.app)
        assert context.service is not None and live.pool is not None
        grpc_server = start_grpc_server(settings, context.service, context.metrics.registry)
        try:
            yield live, grpc_server
        finally:
            grpc_server.stop(grace=1.0)


def figure_jpeg() -> tuple[bytes, list[float]]:
    img, box = figure_frame(3.0)
    return jpeg(img), box


@dataclass
class Answer:
    sent: float
    received: float
    status: int
    version: str
    body: str = ""


@dataclass
class RestLoad:
    """Sequential REST clients (each its own thread): every answer in the order that client got it."""

    url: str
    model: str
    clients: int = 2
    answers: list[list[Answer]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> RestLoad:
        image, box = figure_jpeg()
        for _ in range(self.clients):
            mine: list[Answer] = []
            self.answers.append(mine)
            thread = threading.Thread(target=self._run, args=(mine, image, box), daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def _run(self, out: list[Answer], image: bytes, box: list[float]) -> None:
        import json

        with httpx.Client(base_url=self.url, timeout=60, headers=HEADERS) as client:
            while not self._stop.is_set():
                sent = time.time()
                try:
                    r = client.post("/v1/pose", files={"image": ("f.jpg", image, "image/jpeg")},
                                    data={"boxes": json.dumps([box]), "model": self.model, "flip_test": "false"})
                    version = r.json().get("model_version", "") if r.status_code == 200 else ""
                    out.append(Answer(sent, time.time(), r.status_code, version, "" if r.status_code == 200
                                      else r.text))
                except httpx.HTTPError as exc:  # counted as a failure, never swallowed
                    out.append(Answer(sent, time.time(), 0, "", repr(exc)))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def all(self) -> list[Answer]:
        return [a for mine in self.answers for a in list(mine)]

    def failures(self) -> list[Answer]:
        return [a for a in self.all() if a.status != 200]


@dataclass
class StreamLoad:
    """One gRPC StreamPose call sending a frame every ``period_s`` until stopped."""

    address: str
    model: str
    period_s: float = 0.02
    results: list[pose_pb2.StreamResult] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> StreamLoad:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _requests(self) -> Iterator[pose_pb2.StreamRequest]:
        options = pose_pb2.PoseOptions(model=self.model, flip_test=False)
        yield pose_pb2.StreamRequest(config=pose_pb2.StreamConfig(options=options, max_in_flight=2))
        image, box = figure_jpeg()
        seq = 0
        while not self._stop.wait(self.period_s):
            frame = pose_pb2.Frame(sequence_number=seq, timestamp=seq / 30.0, image=image)
            frame.boxes.add(x=box[0], y=box[1], width=box[2], height=box[3])
            self.sent.append(seq)
            yield pose_pb2.StreamRequest(frame=frame)
            seq += 1

    def _run(self) -> None:
        try:
            with grpc.insecure_channel(self.address) as channel:
                stub = pose_pb2_grpc.PoseServiceStub(channel)
                for result in stub.StreamPose(self._requests(), metadata=METADATA):
                    self.results.append(result)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Wait until ``predicate()`` holds (a bound on waiting, not a latency assertion)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def model_entry(client: httpx.Client, name: str) -> dict:
    body = client.get("/v1/models", headers=HEADERS).json()
    return next(m for m in body["models"] if m["name"] == name)


def versions_in_order(answers: list[Answer]) -> list[str]:
    """The distinct versions one sequential client saw, in the order it first saw each run of them."""
    runs: list[str] = []
    for answer in answers:
        if answer.status == 200 and (not runs or runs[-1] != answer.version):
            runs.append(answer.version)
    return runs
