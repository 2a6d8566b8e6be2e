"""Crops kept uint8 until their batch is assembled give the network the very input of crops
normalised at once (the service queues uint8 crops: a quarter of float32's memory)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ditepose.model.pipeline import TopDownPipeline, normalize_crops
from ditepose.service.batching.assembly import assemble_batch

RIDERS = Path(__file__).resolve().parents[2] / "docs" / "riders.jpg"
# persons of docs/riders.jpg (x, y, w, h), one running past the right edge (zero border in the crop)
BOXES = [[60, 90, 160, 300], [250, 60, 150, 330], [470, 80, 200, 320], [10, 10, 620, 400]]


def _riders() -> np.ndarray:
    image = cv2.imread(str(RIDERS), cv2.IMREAD_COLOR)
    assert image is not None, RIDERS
    return np.ascontiguousarray(image[..., ::-1])


@pytest.mark.parametrize("flip", [True, False])
def test_uint8_crops_normalised_at_batch_time_equal_the_float_crops(flip: bool) -> None:
    image = _riders()
    early = TopDownPipeline(flip_test=flip).prepare(image, BOXES)
    late = TopDownPipeline(flip_test=flip, normalize_on_cpu=False).prepare(image, BOXES)
    assert late.crops.dtype == torch.uint8 and early.crops.dtype == torch.float32
    assert late.crops.element_size() * 4 == early.crops.element_size()
    batch = assemble_batch([late.crops])
    assert batch.dtype == torch.float32 and batch.shape == early.crops.shape
    torch.testing.assert_close(batch, early.crops, atol=1e-6, rtol=0)
    assert torch.equal(batch, early.crops)  # same constants and ops: bit for bit
    assert torch.equal(normalize_crops(late.crops), early.crops)


def test_a_batch_of_uint8_and_float_submissions_keeps_their_order() -> None:
    """Live crops (uint8) and an evaluation job's (float32, normalised by its own pipeline) share a batch."""
    image = _riders()
    live = TopDownPipeline(normalize_on_cpu=False).prepare(image, BOXES[:2]).crops
    job = TopDownPipeline().prepare(image, BOXES[2:]).crops
    other = TopDownPipeline(normalize_on_cpu=False).prepare(image[::-1].copy(), BOXES[1:3]).crops
    batch = assemble_batch([live, job, other])
    expected = torch.cat([normalize_crops(live), job, normalize_crops(other)])
    assert torch.equal(batch, expected)


def test_float_batches_are_joined_unchanged() -> None:
    parts = [torch.randn(2, 3, 8, 6), torch.randn(1, 3, 8, 6)]
    assert torch.equal(assemble_batch(parts), torch.cat(parts))
    assert assemble_batch(parts[:1]) is parts[0]


def test_normalize_into_a_wrong_slice_is_refused() -> None:
    crops = torch.zeros(2, 8, 6, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="float32"):
        normalize_crops(crops, torch.empty(2, 3, 6, 8))
