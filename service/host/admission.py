"""An :class:`~ditepose.service.core.admission.Admission` whose count is shared by all front-ends.

Each front-end counts its own requests in one cell of a shared array, under one shared lock;
the limit applies to the sum, so ``max_in_flight`` holds per host. Per-front-end cells let the
host zero the count of a front-end that died with requests in flight (their slots would
otherwise never be released)."""

from __future__ import annotations

import multiprocessing
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ditepose.service.core.admission import Admission


@dataclass
class SharedCounts:
    """What a front-end process inherits: the lock and the cells (picklable to spawned processes)."""

    lock: Any
    cells: Any  # multiprocessing.Array('q', front_ends), no lock of its own
    peak: Any  # multiprocessing.Value('q'), no lock of its own

    @classmethod
    def create(cls, front_ends: int, context: Any = None) -> SharedCounts:
        ctx = context or multiprocessing.get_context("spawn")
        return cls(ctx.Lock(), ctx.Array("q", front_ends, lock=False), ctx.Value("q", 0, lock=False))

    def total(self) -> int:
        with self.lock:
            return sum(self.cells)

    def forget(self, index: int) -> int:
        """Zero front-end ``index``'s count (it died); returns what it held."""
        with self.lock:
            held, self.cells[index] = self.cells[index], 0
            return held


class SharedAdmission(Admission):
    """The in-flight count of front-end ``index``, limited by the host-wide total."""

    def __init__(self, counts: SharedCounts, index: int, limit: int, retry_after_s: int = 1) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight limit must be >= 1, got {limit}")
        self.counts = counts
        self.index = index
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.rejected: Counter[str] = Counter()  # this front-end's sheds, by transport

    @property
    def in_flight(self) -> int:
        """Requests in flight on the whole host."""
        return self.counts.total()

    @property
    def peak(self) -> int:
        return int(self.counts.peak.value)

    def try_acquire(self, transport: str) -> bool:
        counts = self.counts
        with counts.lock:
            total = sum(counts.cells)
            if total >= self.limit:
                self.rejected[transport] += 1
                return False
            counts.cells[self.index] += 1
            if total + 1 > counts.peak.value:
                counts.peak.value = total + 1
            return True

    def release(self) -> None:
        counts = self.counts
        with counts.lock:
            if counts.cells[self.index] <= 0:
                raise RuntimeError("admission slot released twice")
            counts.cells[self.index] -= 1
