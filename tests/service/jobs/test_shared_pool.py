"""Embedded jobs run on the serving pool: their crops share batches with live requests and yield to them."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from ditepose.service.core.settings import ModelSpec
from ditepose.service.http.deps import context_of
from tests.service.conftest import encode, figure_image, post_pose, start_server
from tests.service.jobs.support import TinyEval, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class BatchLog:
    """Every batch the pool runs: (live crops, job crops)."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def observe_batch(self, model, device, size, infer_s, queued_s, ok, background: int = 0) -> None:
        with self.lock:
            self.batches.append((size - background, background))


def test_embedded_job_shares_the_serving_batches_and_requests_keep_their_deadlines(
    tiny_eval: TinyEval, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DITEPOSE_REDIS_URL", raising=False)
    for key, value in tiny_eval.env(tmp_path / "jobs").items():
        monkeypatch.setenv(key, value)
    served = ModelSpec(name="tiny", checkpoint=tiny_eval.checkpoint_dir / tiny_eval.checkpoint)
    image = encode(figure_image(320, 240))
    statuses: list[int] = []
    stop = threading.Event()

    def load(client: httpx.Client) -> None:
        while not stop.is_set():
            statuses.append(post_pose(client, image, boxes=[[60, 20, 200, 210]]).status_code)

    with start_server(models=[served], workers_per_device=1, max_batch_size=16, max_delay_ms=5,
                      request_timeout_s=20) as live, live.client() as client:
        log = BatchLog()
        context_of(live.app).pool.add_observer(log)
        threads = [threading.Thread(target=load, args=(live.client(),)) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: len(statuses) >= 6, timeout=60, what="REST load to run")
            response = client.post("/v1/evaluate", json={"dataset": "coco-mini-val", "model": "tiny", "batch_size": 8})
            assert response.status_code == 202, response.text
            location = response.headers["Location"]
            body = wait_for(lambda: (b := client.get(location).json())["state"] in ("succeeded", "failed") and b,
                            timeout=300, what="the embedded job")
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        assert body["state"] == "succeeded", body
        scrape = client.get("/metrics").text
    # The job's crops went through the serving pool, in the same batches as request crops.
    job_crops = sum(background for _, background in log.batches)
    assert job_crops >= body["num_persons"] * 2  # flip test: two crops per person
    assert any(live_crops and background for live_crops, background in log.batches), log.batches[:20]
    assert f'ditepose_background_crops_total{{model="tiny"}} {float(job_crops)}' in scrape
    # ... and the requests beside it were all answered within their deadline (no 504, no 429).
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
