"""Prometheus metrics parsed back from the exposition text, and JSON log lines parsed back from a stream."""

from __future__ import annotations

import io
import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.logging_setup import JobLogger, JsonFormatter, configure_json_logging
from orchestrator.metrics import ServiceMetrics


def scrape(metrics: ServiceMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_queue_depth_is_read_at_scrape_time() -> None:
    counts = {"queued": 3, "running": 1}
    metrics = ServiceMetrics(lambda: counts)
    samples = scrape(metrics)
    assert samples[("quantfleet_jobs", (("state", "queued"),))] == 3
    assert samples[("quantfleet_jobs", (("state", "running"),))] == 1
    assert samples[("quantfleet_jobs", (("state", "failed"),))] == 0  # every state is shown, even when empty
    assert samples[("quantfleet_queue_depth_up", ())] == 1
    counts["queued"] = 0
    counts["succeeded"] = 4
    later = scrape(
        metrics
    )  # the same collector: the new numbers come from the callback, not from bookkeeping
    assert later[("quantfleet_jobs", (("state", "queued"),))] == 0
    assert later[("quantfleet_jobs", (("state", "succeeded"),))] == 4


def test_a_failing_database_does_not_fail_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, int]:
        raise ConnectionError("database is down")

    metrics = ServiceMetrics(broken)
    metrics.attempt_finished(method="rtn", outcome="succeeded", duration_s=5, gpus=1)
    samples = scrape(metrics)
    assert samples[("quantfleet_queue_depth_up", ())] == 0
    assert not any(name == "quantfleet_jobs" for name, _ in samples)
    assert (
        samples[("quantfleet_job_duration_seconds_count", (("method", "rtn"), ("outcome", "succeeded")))] == 1
    )
    assert "could not count jobs" in caplog.text


def test_durations_failures_retries_and_gpu_seconds() -> None:
    metrics = ServiceMetrics()
    metrics.attempt_finished(method="gptq", outcome="succeeded", duration_s=45.0, gpus=1)
    metrics.attempt_finished(method="gptq", outcome="retried", duration_s=20.0, gpus=2)
    metrics.attempt_finished(method="gptq", outcome="failed", duration_s=700.0, gpus=0.5)
    metrics.lease_expired()
    metrics.gate_checked(True)
    metrics.gate_checked(False)
    metrics.gate_checked(False)
    s = scrape(metrics)
    ok = (("method", "gptq"), ("outcome", "succeeded"))
    assert s[("quantfleet_job_duration_seconds_count", ok)] == 1
    assert s[("quantfleet_job_duration_seconds_sum", ok)] == 45.0
    assert s[("quantfleet_job_duration_seconds_bucket", (("le", "30.0"), *ok))] == 0
    assert s[("quantfleet_job_duration_seconds_bucket", (("le", "60.0"), *ok))] == 1
    assert s[("quantfleet_gpu_seconds_total", (("method", "gptq"),))] == 45.0 + 40.0 + 350.0
    assert s[("quantfleet_job_failures_total", (("final", "false"), ("method", "gptq")))] == 1
    assert s[("quantfleet_job_failures_total", (("final", "true"), ("method", "gptq")))] == 1
    assert s[("quantfleet_job_retries_total", (("reason", "attempt_failed"),))] == 1
    assert s[("quantfleet_job_retries_total", (("reason", "lease_expired"),))] == 1
    assert s[("quantfleet_gate_results_total", (("result", "failed"),))] == 2
    assert not any(name == "quantfleet_jobs" for name, _ in s)  # no queue-depth callback, no family


def test_two_services_keep_separate_numbers() -> None:
    a, b = ServiceMetrics(), ServiceMetrics()
    a.attempt_finished(method="awq", outcome="succeeded", duration_s=1, gpus=1)
    assert ("quantfleet_gpu_seconds_total", (("method", "awq"),)) not in scrape(b)
    with pytest.raises(ValueError, match="must not be negative"):
        a.attempt_finished(method="awq", outcome="succeeded", duration_s=-1, gpus=1)


def test_json_logs_carry_job_id_and_attempt() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("quantfleet.test_metrics")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("attempt %s started", 2, extra={"job_id": "job_42", "attempt": 2, "node": "n1"})
        JobLogger(logger, "job_7", 3).warning("retrying", extra={"reason": "lease expired"})
        try:
            raise RuntimeError("CUDA out of memory")
        except RuntimeError:
            logger.exception("attempt failed", extra={"job_id": "job_9", "attempt": 1})
    finally:
        logger.removeHandler(handler)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "attempt 2 started" and first["level"] == "INFO"
    assert (first["job_id"], first["attempt"], first["node"]) == ("job_42", 2, "n1")
    assert list(first)[:6] == ["ts", "level", "logger", "msg", "job_id", "attempt"]
    assert first["ts"].endswith("Z") and first["logger"] == "quantfleet.test_metrics"
    assert (second["job_id"], second["attempt"], second["reason"]) == ("job_7", 3, "lease expired")
    assert third["job_id"] == "job_9" and "RuntimeError: CUDA out of memory" in third["exc"]


def test_configure_json_logging_replaces_root_handlers() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        configure_json_logging("DEBUG", stream)
        logging.getLogger("quantfleet.x").debug("hello", extra={"job_id": "j1"})
        assert root.handlers and len(root.handlers) == 1
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)
    assert json.loads(stream.getvalue()) | {"ts": None} == {
        "ts": None,
        "level": "DEBUG",
        "logger": "quantfleet.x",
        "msg": "hello",
        "job_id": "j1",
    }
