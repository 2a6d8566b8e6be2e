"""Concurrent requests share forward passes, and each still gets its own answer."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from ditepose.model.transforms import PIXEL_STD, box_to_center_scale
from ditepose.service.batching.batcher import DynamicBatcher, Overloaded
from tests.service.conftest import encode, figure_image, post_pose
from tests.service.jobs.support import wait_for


def _batch_histogram(metrics: str, model_name: str) -> tuple[float, float]:
    """(batches of size 1, all batches) for ``model_name`` from the Prometheus text."""
    ones = re.search(rf'ditepose_batch_size_bucket{{device="cpu",le="1.0",model="{model_name}"}} (\S+)', metrics)
    count = re.search(rf'ditepose_batch_size_count{{device="cpu",model="{model_name}"}} (\S+)', metrics)
    if ones is None or count is None:
        return 0.0, 0.0  # no batch has run for this model yet
    return float(ones.group(1)), float(count.group(1))


def _crop_region(box: list[float]) -> tuple[np.ndarray, np.ndarray]:
    center, scale = box_to_center_scale(np.array(box), 192 / 256, 1.25)
    half = scale * PIXEL_STD / 2
    return center - half, center + half


def test_concurrent_requests_are_batched_and_answers_stay_apart(server):
    """8 concurrent requests, each with a box in its own cell of a 4x2 grid.

    Crop regions do not overlap, so an answer routed to the wrong request would put its
    keypoints in another cell. (Exact values are not compared with unbatched runs: with
    random weights, fp32 results depend on the batch's size through the conv algorithm.)
    """
    img = np.concatenate([np.concatenate([figure_image(320, 480, seed=i + 4 * j) for i in range(4)], 1)
                          for j in range(2)], 0)
    png = encode(img, ".png")
    boxes = [[80.0 + 320 * i + 3 * j, 100.0 + 480 * j, 130.0 + 5 * i, 260.0 - 10 * j]
             for j in range(2) for i in range(4)]
    with server.client() as client:
        ones_before, count_before = _batch_histogram(client.get("/metrics").text, "hrnet18")

    def call(box: list[float]) -> dict:
        with server.client() as client:
            response = post_pose(client, png, boxes=[box], model="hrnet18", flip_test=False)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(len(boxes)) as pool:
        answers = list(pool.map(call, boxes))

    for box, answer in zip(boxes, answers, strict=True):
        (person,) = answer["persons"]
        assert person["bbox"] == box
        low, high = _crop_region(box)
        xy = np.array([[k["x"], k["y"]] for k in person["keypoints"]])
        margin = (high - low) / 24  # two heatmap pixels: all-negative maps decode to -1 (mmpose)
        assert (xy >= low - margin).all() and (xy <= high + margin).all(), (box, xy)

    with server.client() as client:
        ones_after, count_after = _batch_histogram(client.get("/metrics").text, "hrnet18")
    batches = count_after - count_before
    assert 1 <= batches < len(boxes)  # fewer forward passes than requests
    assert ones_after - ones_before < batches  # at least one batch held more than one crop


def test_large_request_is_split_into_max_batch_chunks(server):
    """8 persons with flip = 16 crops; the pool still answers all of them in order."""
    png = encode(figure_image(seed=22), ".png")
    boxes = [[20.0 + 70 * i, 40.0, 60.0, 300.0] for i in range(8)]
    with server.client() as client:
        response = post_pose(client, png, boxes=boxes, model="hrnet18")
    assert response.status_code == 200, response.text
    assert [p["bbox"] for p in response.json()["persons"]] == boxes


def test_background_crops_fill_batches_after_live_ones_and_are_never_shed() -> None:
    batcher = DynamicBatcher("m", max_batch_size=4, max_delay_ms=1.0, queue_size=2, default_timeout_s=30.0)
    results: dict[str, torch.Tensor] = {}

    def submit(name: str, count: int, background: bool) -> None:
        results[name] = batcher.submit_sync(torch.full((count, 1, 1, 1), float(len(name))), background=background)

    job = threading.Thread(target=submit, args=("job", 6, True))
    job.start()
    wait_for(lambda: batcher.background_depth == 6, timeout=10, what="the background crops to queue")
    live = threading.Thread(target=submit, args=("li", 2, False))
    live.start()
    wait_for(lambda: batcher.depth == 2, timeout=10, what="the live crops to queue")
    # the live queue is full (2 of 2): live requests are shed, background work is not counted
    with pytest.raises(Overloaded):
        batcher.check_admission()
    first = batcher.next_batch(1.0)
    assert [item.background for item in first.items] == [False, True, True]  # live first, background fills up
    assert (first.size, first.background_size) == (4, 2)
    first.complete(first.tensor() * 10)
    second = batcher.next_batch(1.0)
    assert (second.size, second.background_size) == (4, 4)
    second.complete(second.tensor() * 10)
    live.join(10)
    job.join(10)
    assert results["li"].flatten().tolist() == [20.0, 20.0]
    assert results["job"].flatten().tolist() == [30.0] * 6
    assert batcher.rejected == 1
