"""``ditepose serve --api-processes 2`` for real: a host process, two front-end processes, one
REST port and one gRPC port, a tiny model on CPU.

Which front-end answered is in the ``x-ditepose-api-process`` header; an HTTP client with one
keep-alive connection stays on one front-end, so a test can send from each on purpose.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.service_support import free_port
from bench.service_support import test_jpeg as make_jpeg
from ditepose.proto.ditepose.v1 import pose_pb2, pose_pb2_grpc
from ditepose.service.host.frontend import PROCESS_HEADER
from tests.conftest import REPO_ROOT, python_cmd, subprocess_env
from tests.service.grpc.support import tiny_checkpoint

JPEG, BOX = make_jpeg()
READY_S = 300.0  # start-up on a loaded 2-core machine: three interpreters importing torch


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    rest: str
    grpc_target: str
    log: Path

    def children(self) -> list[int]:
        return children_of(self.proc.pid)

    def front_ends(self) -> list[int]:
        return [pid for pid in self.children() if b"spawn_main" in _cmdline(pid)]

    @contextlib.contextmanager
    def client(self, index: int) -> Iterator[httpx.Client]:
        """A client whose one connection is served by front-end ``index`` (waits for it to serve)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            client = httpx.Client(base_url=self.rest, timeout=60, limits=httpx.Limits(max_connections=1))
            if client.get("/healthz").headers[PROCESS_HEADER].startswith(f"api-{index}/"):
                try:
                    yield client
                finally:
                    client.close()
                return
            client.close()
        raise AssertionError(f"no connection reached front-end {index} within 120 s")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, what: str, timeout_s: float = 120.0, period_s: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll ``condition`` until it returns something truthy (a bound on waiting, not a timing check)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(period_s)
    raise AssertionError(f"gave up waiting for {what}")


@contextlib.contextmanager
def serve(tmp: Path, **env: str) -> Iterator[Served]:
    checkpoint = tiny_checkpoint(tmp / "tiny.pth")
    rest_port, grpc_port = free_port(), free_port()
    env = {
        "DITEPOSE_MODELS": json.dumps([{"name": "tiny", "checkpoint": str(checkpoint)}]),
        "DITEPOSE_DEVICES": "cpu", "DITEPOSE_WORKERS_PER_DEVICE": "1", "DITEPOSE_DETECTOR": "whole", **env,
    }
    log = tmp / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            python_cmd("serve", "--api-processes", "2", "--port", str(rest_port), "--grpc-port", str(grpc_port)),
            cwd=REPO_ROOT, env=subprocess_env(**env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    served = Served(proc, f"http://127.0.0.1:{rest_port}", f"127.0.0.1:{grpc_port}", log)
    try:
        def announced() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            return b"API processes share these ports" in log.read_bytes()

        wait_for(announced, "the host to announce its front-ends", READY_S)
        yield served
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the session (nothing, normally)


def batch_totals(client: httpx.Client, model: str = "tiny") -> tuple[float, float]:
    """(batches, crops) of ``model`` from a front-end's /metrics (the host's batches)."""
    count = total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "ditepose_batch_size":
            for sample in family.samples:
                if sample.labels.get("model") == model and sample.name.endswith("_count"):
                    count += sample.value
                elif sample.labels.get("model") == model and sample.name.endswith("_sum"):
                    total += sample.value
    return count, total


def settled_totals(client: httpx.Client) -> tuple[float, float]:
    """:func:`batch_totals` once every batch the host's workers ran has reached this front-end's
    metrics (observations follow the worker counts by up to one status message)."""
    def settled() -> tuple[float, float] | None:
        totals = batch_totals(client)
        ran = sum(w["batches"] for w in client.get("/readyz").json()["workers"])
        return totals if totals[0] == ran else None

    return wait_for(settled, "the host's batch observations to reach the metrics")


def gauge(client: httpx.Client, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def post_pose(client: httpx.Client, flip: bool) -> httpx.Response:
    data = {"boxes": json.dumps([BOX]), "flip_test": "true" if flip else "false"}
    return client.post("/v1/pose", files={"image": ("p.jpg", JPEG, "image/jpeg")}, data=data)


def grpc_estimate(target: str, flip: bool | None = None) -> pose_pb2.EstimateResponse:
    options = pose_pb2.PoseOptions() if flip is None else pose_pb2.PoseOptions(flip_test=flip)
    request = pose_pb2.EstimateRequest(image=JPEG, boxes=[pose_pb2.Box(x=BOX[0], y=BOX[1], width=BOX[2],
                                                                         height=BOX[3])], options=options)
    with grpc.insecure_channel(target) as channel:
        return pose_pb2_grpc.PoseServiceStub(channel).Estimate(request, timeout=60)


# ---------------------------------------------------------------- batching across front-ends
@pytest.fixture(scope="module")
def batching(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Batches of 2 crops, held open up to 10 s: one crop from each of two requests fills one,
    a flip-test request (2 crops) fills one alone."""
    with serve(tmp_path_factory.mktemp("batching"), DITEPOSE_MAX_BATCH_SIZE="2",
               DITEPOSE_MAX_DELAY_MS="10000") as served:
        yield served


def test_rest_and_grpc_answer_on_one_port_each(batching: Served) -> None:
    assert len(batching.front_ends()) == 2
    seen = set()
    for index in (0, 1):
        with batching.client(index) as client:
            reply = post_pose(client, flip=True)
            assert reply.status_code == 200, reply.text
            assert len(reply.json()["persons"]) == 1
            seen.add(reply.headers[PROCESS_HEADER].split("/")[0])
            ready = client.get("/readyz").json()
            assert ready["ready"] is True and ready["workers"][0]["alive"] is True
    assert seen == {"api-0", "api-1"}
    reply = grpc_estimate(batching.grpc_target)
    assert len(reply.persons) == 1 and len(reply.persons[0].keypoints) == 17


def _one_batch_from(batching: Served, send_a, send_b) -> None:  # type: ignore[no-untyped-def]
    """Two one-crop submissions sent at once end as one batch of 2 crops in the host."""
    with batching.client(0) as watcher:
        before = settled_totals(watcher)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            a, b = pool.submit(send_a), pool.submit(send_b)
            a.result(120), b.result(120)
        after = wait_for(lambda: (t := settled_totals(watcher))[0] > before[0] and t, "the batch in the metrics")
    # One forward pass ran both crops: neither front-end alone sent more than one.
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2)


def test_requests_from_both_front_ends_meet_in_one_batch(batching: Served) -> None:
    with batching.client(0) as c0, batching.client(1) as c1:
        def send(client: httpx.Client) -> None:
            reply = post_pose(client, flip=False)
            assert reply.status_code == 200, reply.text

        _one_batch_from(batching, lambda: send(c0), lambda: send(c1))


def test_rest_and_grpc_crops_meet_in_one_batch(batching: Served) -> None:
    with batching.client(0) as c0:
        def rest() -> None:
            assert post_pose(c0, flip=False).status_code == 200

        def rpc() -> None:
            assert len(grpc_estimate(batching.grpc_target, flip=False).persons) == 1

        _one_batch_from(batching, rest, rpc)


def test_a_killed_front_end_is_restarted_and_the_service_keeps_answering(batching: Served) -> None:
    before = batching.front_ends()
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    now = wait_for(lambda: (f := batching.front_ends()) and victim not in f and len(f) == 2 and f,
                   "a replacement front-end")
    assert set(now) - set(before)  # a new process, not a survivor counted twice
    assert b"restarting it" in batching.log.read_bytes()
    with batching.client(0) as c0, batching.client(1) as c1:
        wait_for(lambda: c0.get("/readyz").status_code == 200 and c1.get("/readyz").status_code == 200,
                 "both front-ends ready")
        for client in (c0, c1, c0, c1):
            reply = post_pose(client, flip=True)
            assert reply.status_code == 200, reply.text
    assert len(grpc_estimate(batching.grpc_target).persons) == 1


def test_killing_the_host_leaves_no_orphans(batching: Served) -> None:
    """Last in this module: it ends the module's server."""
    descendants = batching.children()
    front_ends = batching.front_ends()
    assert len(front_ends) == 2
    os.kill(batching.proc.pid, signal.SIGKILL)
    batching.proc.wait(30)
    wait_for(lambda: not any(alive(pid) for pid in descendants), "the host's children to exit", 60)


# ---------------------------------------------------------------- admission for the whole host
def test_the_queue_bound_and_the_in_flight_count_are_the_hosts(tmp_path: Path) -> None:
    """A queue of 1 crop: a request waiting on front-end 0 fills it, so front-end 1 answers 429;
    front-end 1 also counts front-end 0's request in flight."""
    with serve(tmp_path, DITEPOSE_QUEUE_SIZE="1", DITEPOSE_MAX_BATCH_SIZE="4",
               DITEPOSE_MAX_DELAY_MS="5000") as served, served.client(0) as c0, served.client(1) as c1:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post_pose, c0, False)  # 1 crop, held for 5 s of quiet
            wait_for(lambda: gauge(c1, "ditepose_queue_depth", model="tiny") == 1, "front-end 0's crop queued")
            assert gauge(c1, "ditepose_in_flight_requests") == 1
            refused = post_pose(c1, flip=False)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "overloaded"
            assert refused.headers[PROCESS_HEADER].startswith("api-1/")
            assert waiting.result(120).status_code == 200
        assert gauge(c1, "ditepose_in_flight_requests") == 0


# ---------------------------------------------------------------- detection through the host
def test_requests_without_boxes_are_detected_on_the_hosts_workers(tmp_path: Path) -> None:
    from ditepose.model.weight_store import NANODET, problems

    if issues := problems(NANODET):
        pytest.skip(f"NanoDet weights are not present: {'; '.join(issues)}")
    with serve(tmp_path, DITEPOSE_DETECTOR="nanodet") as served, served.client(0) as c0, served.client(1) as c1:
        for client in (c0, c1):
            reply = client.post("/v1/pose", files={"image": ("p.jpg", JPEG, "image/jpeg")})
            assert reply.status_code == 200, reply.text
            assert "persons" in reply.json()
        # Both front-ends' images ran on the host's workers: its detector batches reach every /metrics.
        images = wait_for(lambda: (v := gauge(c1, "ditepose_detection_batch_size_sum", detector="nanodet")) and v >= 2
                          and v, "the host's detection batches in the metrics")
        assert images == 2  # one image from each front-end, as seen by front-end 1
        assert "detect:nanodet" in c0.get("/readyz").json()["queue_depth"]
