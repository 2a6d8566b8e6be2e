"""A running job's lease, renewed from a background thread.

Renewal must not wait for the next batch (a model load or a slow batch could outlast the
TTL); the thread renews every third of the TTL, carries the latest progress along, and
notes whether the lease was lost or a cancel was requested. Between batches the job calls
:meth:`Lease.check`. When the process dies the renewals stop and the lease runs out, so
another worker may take the job over.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker now owns the job (this one stalled past the lease TTL)."""


class Lease:
    def __init__(self, store: Any, job_id: str, token: str, ttl_s: float) -> None:
        self.store, self.job_id, self.token, self.ttl_s = store, job_id, token, ttl_s
        self.progress = 0.0
        self.cancel_requested = False
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id[:8]}", daemon=True)

    def renew(self) -> None:
        try:
            owned, cancel = self.store.heartbeat(self.job_id, self.token, self.ttl_s, self.progress)
        except Exception as exc:  # Redis blip: keep trying until the TTL says otherwise
            log.warning("job %s: lease renewal failed: %s", self.job_id, exc)
            return
        self.lost = self.lost or not owned
        self.cancel_requested = self.cancel_requested or cancel

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            self.renew()

    def check(self) -> None:
        """Renew now (storing progress) and raise :class:`LeaseLost` if the job is no longer ours."""
        self.renew()
        if self.lost:
            raise LeaseLost(self.job_id)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
