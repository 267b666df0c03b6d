"""Fault: a dispatcher dies mid-job (SIGKILL, so it cannot hand the job back). Its lease expires, another
dispatcher re-runs the job, and it succeeds exactly once (test_ray_faults.py kills a Ray worker instead)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.dispatcher import Dispatcher, start_in_thread
from orchestrator.executors import ThreadExecutor
from tests.orchestrator.support import (
    assert_succeeded_once_after_two_attempts,
    load_job,
    service_settings,
    sessions_for,
    slow_body,
    stop,
    submit,
    wait_for_quantizing,
    wait_for_state,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.postgres
def test_dead_dispatcher_lease_expires_and_another_finishes_the_job(
    clean_postgres_url: str, allowed_root: Path, tiny_assets: dict, slow_model: Path, tmp_path: Path
) -> None:
    database_url = clean_postgres_url
    settings = service_settings(database_url, allowed_root, tmp_path, lease_seconds=3.0)
    sessions = sessions_for(database_url)
    job_id = submit(sessions, slow_body(tiny_assets, slow_model), settings)
    env = {
        **os.environ,
        "QF_DATABASE_URL": database_url,
        "QF_OBJECT_STORE": settings.object_store,
        "QF_ALLOWED_ROOTS": str(allowed_root),
        "QF_CACHE_DIR": str(settings.cache_dir),
        "QF_WORK_DIR": str(settings.work_dir),
        "QF_LEASE_SECONDS": "3",
        "QF_POLL_SECONDS": "0.1",
    }
    first = subprocess.Popen(
        [sys.executable, "-m", "quantfleet.cli", "dispatcher", "--executor", "thread", "--name", "doomed"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_quantizing(sessions, job_id)
        first.send_signal(signal.SIGKILL)  # no chance to hand the job back: only the lease can tell
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert load_job(sessions, job_id).state == "running"
    worker = start_in_thread(Dispatcher(sessions, ThreadExecutor(1), settings, name="rescuer"))
    try:
        wait_for_state(sessions, job_id, {"succeeded", "failed"}, timeout=120)
    finally:
        stop(worker)
    history = assert_succeeded_once_after_two_attempts(sessions, settings, job_id)
    rescue = next(e for e in history if e.state == "queued" and e.attempt == 1)
    assert "lost its lease (held by doomed)" in rescue.message
    owners = [e.data["lease_owner"] for e in history if e.state == "running"]
    assert owners == ["doomed", "rescuer"]
