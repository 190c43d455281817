"""GET /metrics in the Prometheus text format (prometheus_client): the batcher's queue and counters,
read when scraped, and the latency of generation requests. One registry per app."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .batcher import Batcher

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Request latency buckets in seconds: a tiny model answers in well under a second, Mega on a CPU in minutes.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# One decoding step: ~1 ms for the built-in model, ~20 ms for mini on a CPU, more for big batches.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class BatcherCollector(Collector):
    """Queue depth and job counters of a batcher, as they are at scrape time."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        depth, stats = self.batcher.depth(), self.batcher.stats
        for name, help_text in (
            ("queued_requests", "requests waiting for the model"),
            ("queued_images", "images waiting for the model"),
            ("running_requests", "requests being generated"),
            ("running_images", "images being generated"),
        ):
            yield GaugeMetricFamily(f"dallemini_{name}", help_text, value=depth[name])
        jobs = CounterMetricFamily(
            "dallemini_requests", "generation requests by outcome", labels=["outcome"]
        )
        for outcome in ("done", "failed", "cancelled", "expired", "rejected"):
            jobs.add_metric([outcome], getattr(stats, outcome))
        yield jobs
        yield CounterMetricFamily("dallemini_images", "images generated", value=stats.images)
        yield CounterMetricFamily(
            "dallemini_batches",
            "decoder batches run (continuous: requests admitted)",
            value=stats.batches,
        )
        yield CounterMetricFamily(
            "dallemini_steps", "decoding steps of the continuous batch", value=stats.steps
        )
        yield CounterMetricFamily(
            "dallemini_busy_seconds", "seconds the model spent generating", value=stats.busy_s
        )


class Metrics:
    """An app's metrics: the batcher's, the latency of each generation request, and (continuous
    batching) each decoding step's time and rows and each request's time to its first image token."""

    def __init__(self, batcher: Batcher) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(BatcherCollector(batcher))
        self.step = Histogram(
            "dallemini_step_seconds",
            "time of one decoding step of the running batch",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.rows = Histogram(
            "dallemini_step_rows",
            "decoder rows (two per image with super-conditioning) in one decoding step",
            buckets=ROW_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "dallemini_time_to_first_token_seconds",
            "time from a request's arrival to its first image token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        batcher.on_step = self._on_step
        batcher.on_first_token = self.first_token.observe
        self.latency = Histogram(
            "dallemini_request_seconds",
            "time from a generation request's arrival to its answer",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    @contextmanager
    def timed(self, route: str) -> Iterator[None]:
        """Observe how long the block takes as one request of `route`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.latency.labels(route).observe(time.perf_counter() - start)

    def _on_step(self, seconds: float, rows: int) -> None:
        self.step.observe(seconds)
        self.rows.observe(rows)

    def text(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
