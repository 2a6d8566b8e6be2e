"""Prometheus metrics of the gRPC front-end, registered next to the REST app's (same /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ditepose.service.core.metrics import LATENCY_BUCKETS


class GrpcMetrics:
    """Calls by method and status, unary latency, open streams and frame outcomes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.calls = Counter(
            "ditepose_grpc_calls", "gRPC calls by method and final status code", ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ditepose_grpc_call_duration_seconds", "gRPC unary call latency", ["method"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.streams = Gauge("ditepose_grpc_active_streams", "StreamPose calls open now", registry=self.registry)
        self.frames = Counter(
            "ditepose_grpc_stream_frames", "Stream frames by outcome (answered, error, dropped)", ["outcome"],
            registry=self.registry,
        )

    def observe_call(self, method: str, code: str, seconds: float | None = None) -> None:
        self.calls.labels(method, code).inc()
        if seconds is not None:
            self.latency.labels(method).observe(seconds)

    def observe_frames(self, answered: int, errors: int, dropped: int) -> None:
        self.frames.labels("answered").inc(answered - errors)
        self.frames.labels("error").inc(errors)
        self.frames.labels("dropped").inc(dropped)
