"""Fault: the Ray worker process running a job is killed mid-quantization. Ray reports the task lost, the
dispatcher records a retryable failure, and the retry on a fresh worker succeeds exactly once."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from orchestrator.dispatcher import Dispatcher, start_in_thread
from tests.orchestrator.support import (
    assert_succeeded_once_after_two_attempts,
    quantizing_pid,
    service_settings,
    sessions_for,
    slow_body,
    stop,
    submit,
    wait_for,
    wait_for_state,
)


@pytest.mark.ray
def test_killed_ray_worker_is_retried_and_succeeds(
    ray_cluster: None,
    clean_sqlite_url: str,
    allowed_root: Path,
    tiny_assets: dict,
    slow_model: Path,
    tmp_path: Path,
) -> None:
    from orchestrator.executors.ray_executor import RayExecutor

    settings = service_settings(clean_sqlite_url, allowed_root, tmp_path, executor="ray", lease_seconds=30.0)
    sessions = sessions_for(clean_sqlite_url)
    job_id = submit(sessions, slow_body(tiny_assets, slow_model), settings)
    worker = start_in_thread(Dispatcher(sessions, RayExecutor(capacity=1), settings))

    try:
        pid = wait_for(lambda: quantizing_pid(sessions, job_id), 300, "attempt 1 to start quantizing on a Ray worker")
        assert pid != os.getpid()  # a separate Ray worker process
        os.kill(pid, signal.SIGKILL)
        wait_for_state(sessions, job_id, {"succeeded", "failed"}, timeout=180)
    finally:
        stop(worker)
    history = assert_succeeded_once_after_two_attempts(sessions, settings, job_id)
    retry = next(e for e in history if e.state == "queued" and e.attempt == 1)
    assert retry.message.startswith("retrying: worker died")
    pids = [e.data["pid"] for e in history if e.kind == "attempt"]
    assert pids[0] == pid and pids[1] != pid
