"""Prometheus metrics for the service, each set in its own registry (no process-wide global state, so
tests and several services in one process never see each other's numbers).

Queue depth is not a counter the code keeps in step with the database: it is read from the database
at scrape time through a callback, so it is right whichever process changed a job. Durations, failures,
retries and GPU-seconds are observed by the process that finishes an attempt (the dispatcher) and served
on that process's /metrics; `quantfleet serve` runs the API and the dispatcher in one process, so one
scrape shows everything. A failing queue-depth callback (database down) drops only that family and
sets `quantfleet_queue_depth_up 0`, so the scrape itself still succeeds and says what is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.queue.states import JobState

log = logging.getLogger("quantfleet.metrics")

# Quantization runs from seconds (tiny models) to many hours (70B on one GPU).
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 57600, float("inf"))

QueueDepth = Callable[[], Mapping[str, int]]


class QueueDepthCollector(Collector):
    """`quantfleet_jobs{state=...}`: how many jobs are in each state right now, asked of the database."""

    def __init__(self, count_by_state: QueueDepth) -> None:
        self.count_by_state = count_by_state

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "quantfleet_queue_depth_up", "1 if the job counts could be read at this scrape"
        )
        try:
            counts = dict(self.count_by_state())
        except Exception:  # the scrape must survive a database outage
            log.exception("could not count jobs by state for /metrics")
            up.add_metric([], 0)
            yield up
            return
        jobs = GaugeMetricFamily("quantfleet_jobs", "Jobs in each state right now", labels=["state"])
        for known in JobState:
            jobs.add_metric([known.value], counts.pop(known.value, 0))
        for other, count in sorted(counts.items()):  # states this version does not know: still shown
            jobs.add_metric([other], count)
        up.add_metric([], 1)
        yield jobs
        yield up

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: never called at registration time


class ServiceMetrics:
    """Everything /metrics shows, in one registry."""

    def __init__(
        self, count_by_state: QueueDepth | None = None, *, registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.job_duration = Histogram(
            "quantfleet_job_duration_seconds",
            "Wall time of finished attempts, from start to terminal state",
            ["method", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.failures = Counter(
            "quantfleet_job_failures",
            "Attempts that failed, by whether the job will be retried",
            ["method", "final"],
            registry=self.registry,
        )
        self.retries = Counter(
            "quantfleet_job_retries",
            "Jobs put back in the queue for another attempt",
            ["reason"],
            registry=self.registry,
        )
        self.gpu_seconds = Counter(
            "quantfleet_gpu_seconds",
            "GPU time held by attempts (GPUs requested × wall seconds)",
            ["method"],
            registry=self.registry,
        )
        self.gate_results = Counter(
            "quantfleet_gate_results",
            "Quality gate verdicts of succeeded jobs",
            ["result"],
            registry=self.registry,
        )
        self._queue: QueueDepthCollector | None = None
        if count_by_state is not None:
            self.watch_queue(count_by_state)

    def watch_queue(self, count_by_state: QueueDepth) -> None:
        """Report queue depth from `count_by_state` at every scrape (replaces an earlier source)."""
        if self._queue is not None:
            self.registry.unregister(self._queue)
        self._queue = QueueDepthCollector(count_by_state)
        self.registry.register(self._queue)

    def attempt_finished(self, *, method: str, outcome: str, duration_s: float, gpus: float) -> None:
        """Record one finished attempt. `outcome` is succeeded, failed, cancelled or retried."""
        if duration_s < 0 or gpus < 0:
            raise ValueError(f"duration_s={duration_s} and gpus={gpus} must not be negative")
        self.job_duration.labels(method=method, outcome=outcome).observe(duration_s)
        self.gpu_seconds.labels(method=method).inc(gpus * duration_s)
        if outcome in ("failed", "retried"):
            self.failures.labels(method=method, final=str(outcome == "failed").lower()).inc()
        if outcome == "retried":
            self.retries.labels(reason="attempt_failed").inc()

    def lease_expired(self) -> None:
        """A rescuer re-queued a job whose attempt stopped heartbeating."""
        self.retries.labels(reason="lease_expired").inc()

    def gate_checked(self, passed: bool) -> None:
        self.gate_results.labels(result="passed" if passed else "failed").inc()

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of a /metrics response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
