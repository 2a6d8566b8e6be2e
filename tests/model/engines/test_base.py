"""The one pad-and-split of fixed-batch engines: results as one unpadded call's, only bucket sizes run."""

from __future__ import annotations

import pytest
import torch

from ditepose.model.engines import buckets_up_to, run_in_buckets
from ditepose.model.engines.base import check_buckets


def _recording(sizes: list[int]):
    def run(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return x * 2 + torch.arange(x.shape[1]).view(1, -1, 1, 1)  # rows computed on their own

    return run


@pytest.mark.parametrize(("rows", "buckets", "calls"), [
    (1, (2, 4), [2]),  # padded up to the smallest bucket
    (3, (2, 4), [4]),
    (4, (2, 4), [4]),  # exactly one bucket: no padding
    (5, (2, 4), [4, 2]),  # split past the largest, the rest padded
    (7, (3,), [3, 3, 3]),  # a fixed-batch engine (one bucket)
])
def test_only_bucket_sizes_run_and_rows_come_back_in_order(rows: int, buckets: tuple[int, ...],
                                                            calls: list[int]) -> None:
    batch = torch.randn(rows, 3, 4, 4)
    sizes: list[int] = []
    out = run_in_buckets(_recording(sizes), batch, buckets)
    assert sizes == calls
    assert torch.equal(out, _recording([])(batch))


def test_buckets_are_checked_and_derived() -> None:
    assert check_buckets((4, 1, 2, 2)) == (1, 2, 4)
    with pytest.raises(ValueError, match="batch_buckets must be positive"):
        check_buckets((0, 4))
    assert buckets_up_to(48) == (1, 2, 4, 8, 16, 32, 48)
    assert buckets_up_to(1) == (1,)
    with pytest.raises(ValueError, match="max_batch"):
        buckets_up_to(0)
