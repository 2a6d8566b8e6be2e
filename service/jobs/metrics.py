"""Prometheus metrics of the evaluation jobs.

:class:`JobMetrics` goes into the app's registry (embedded mode runs jobs in the API process)
and into the worker's (``ditepose worker --metrics-port``, multiprocess-safe for the prefork
pool). :class:`JobStoreCollector` reads the job records by state at scrape time, so the API
shows queued/running/finished counts even when workers elsewhere do the work.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class JobMetrics:
    """Submitted, running, finished-by-state and duration of evaluation jobs."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.submitted = Counter(
            "ditepose_jobs_submitted", "Evaluation jobs accepted by POST /v1/evaluate", ["dataset"],
            registry=self.registry,
        )
        self.running = Gauge(
            "ditepose_jobs_running", "Evaluation jobs running in this process (or worker pool)",
            registry=self.registry, multiprocess_mode="livesum",
        )
        self.finished = Counter(
            "ditepose_jobs_finished", "Evaluation jobs finished, by final state", ["state"], registry=self.registry
        )
        self.duration = Histogram(
            "ditepose_job_duration_seconds", "Run time of finished evaluation jobs, by final state", ["state"],
            buckets=DURATION_BUCKETS, registry=self.registry,
        )

    def job_submitted(self, dataset: str) -> None:
        self.submitted.labels(dataset).inc()

    def job_started(self) -> None:
        self.running.inc()

    def job_stopped(self) -> None:
        self.running.dec()

    def job_finished(self, state: str, seconds: float) -> None:
        self.finished.labels(state).inc()
        self.duration.labels(state).observe(seconds)


class JobStoreCollector(Collector):
    """``ditepose_job_records{state}``: jobs the store holds per state, read at scrape time."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("ditepose_job_records", "Evaluation job records by state", labels=["state"])
        up = GaugeMetricFamily("ditepose_jobs_backend_up", "1 when the job store (Redis) answers")
        try:
            counts = self.store.counts()
        except Exception:
            counts = {}
        for state, n in counts.items():
            family.add_metric([state], n)
        up.add_metric([], 1.0 if counts else 0.0)
        yield family
        yield up


def enable_multiprocess_metrics() -> str:
    """Make metrics created from now on shared by forked pool children (prometheus multiprocess mode)."""
    from prometheus_client import values

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="ditepose-worker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.get_value_class()
    return path


def serve_worker_metrics(port: int, host: str = "127.0.0.1") -> CollectorRegistry:
    """Expose the (multiprocess) job metrics of a worker on ``host:port``/metrics."""
    from prometheus_client import start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, addr=host, registry=registry)
    return registry
