"""Prometheus metrics, one registry per app (tests make many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sam2_requests", "HTTP requests by endpoint and outcome", ["endpoint", "outcome"], registry=r
        )
        self.latency = Histogram(
            "sam2_request_seconds",
            "Request latency by endpoint and outcome",
            ["endpoint", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            "sam2_model_seconds",
            "Time in the image encoder / mask decoder",
            ["part"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tasks = Counter("sam2_tasks", "Tasks answered, by outcome", ["outcome"], registry=r)
        self.in_flight = Gauge("sam2_requests_in_flight", "Requests being served or queued", registry=r)
        self.queue_rejected = Counter(
            "sam2_queue_rejected", "/predict requests answered 503 because the queue was full", registry=r
        )
        self._sources: list = []
        r.register(_Collector(self._sources))

    def watch(self, fn) -> None:
        """`fn()` returns [(name, help, value)] at scrape time (cache sizes, GPU memory...)."""
        self._sources.append(fn)


class _Collector:
    def __init__(self, sources):
        self.sources = sources

    def collect(self):
        for fn in self.sources:
            for name, help_text, value in fn():
                g = GaugeMetricFamily(name, help_text)
                g.add_metric([], float(value))
                yield g
