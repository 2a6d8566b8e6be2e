"""Early admission control: a count of pose requests in flight, shared by REST and gRPC.

The batcher sheds by queued crops, but only once a request has been read, parsed and
decoded, so under overload a 429 waited behind that work. :class:`Admission` counts the
requests admitted and not yet answered and refuses new ones past ``limit`` before anything
of theirs is read; :class:`ditepose.service.http.middleware.AdmissionControl` applies it to ``POST /v1/pose``,
and the gRPC ``Estimate`` handler takes a slot the same way. The batcher's check stays the
final say (it counts crops, which the request count cannot know in advance).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from ditepose.service.core.errors import ServiceError


class Admission:
    """At most ``limit`` requests in flight; thread-safe (REST and gRPC run on different loops)."""

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight limit must be >= 1, got {limit}")
        self.limit = limit
        self.retry_after_s = retry_after_s
        self._in_flight = 0
        self._peak = 0
        self.rejected: Counter[str] = Counter()  # by transport ("rest", "grpc")
        self._lock = threading.Lock()

    def try_acquire(self, transport: str) -> bool:
        """Take a slot; False (and counted as rejected) when all ``limit`` are taken."""
        with self._lock:
            if self._in_flight >= self.limit:
                self.rejected[transport] += 1
                return False
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
            return True

    def release(self) -> None:
        with self._lock:
            if self._in_flight <= 0:
                raise RuntimeError("admission slot released twice")
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered."""
        return self._in_flight

    @property
    def peak(self) -> int:
        """The most requests that were in flight at once."""
        return self._peak

    def overloaded(self) -> ServiceError:
        return ServiceError(
            "overloaded",
            f"{self.in_flight} requests in flight (the limit is {self.limit}); retry after {self.retry_after_s} s",
            {"Retry-After": str(self.retry_after_s)},
        )

    @contextmanager
    def slot(self, transport: str) -> Iterator[None]:
        """Hold a slot for the block; raise ``overloaded`` at once when none is free."""
        if not self.try_acquire(transport):
            raise self.overloaded()
        try:
            yield
        finally:
            self.release()
