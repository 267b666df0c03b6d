"""A rolling deploy costs a job nothing: a dispatcher that stops gracefully while its attempt runs leaves
the attempt running under the same attempt number, another dispatcher adopts its lease, and the job
finishes with its attempt count unchanged. An adopted attempt whose worker stops beating is still rescued."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db import transaction
from orchestrator.dispatcher import Dispatcher, start_in_thread
from orchestrator.executors import ThreadExecutor
from orchestrator.executors.base import Executor
from orchestrator.queue import crud
from orchestrator.queue.leases import (
    RetryPolicy,
    adopt_leases,
    claim_jobs,
    hand_off,
    renew_adopted,
    rescue_expired,
)
from orchestrator.queue.models import Job, JobEvent, utcnow
from orchestrator.queue.states import JobState
from orchestrator.settings import Settings
from tests.orchestrator.support import (
    assert_handed_over_once,
    load_job,
    service_settings,
    sessions_for,
    slow_body,
    stop,
    submit,
    wait_for_quantizing,
    wait_for_state,
)


def rolling_deploy(
    sessions: sessionmaker[Session], settings: Settings, job_id: str, executor: Callable[[], Executor]
) -> list[JobEvent]:
    """Dispatcher "old" runs the job; mid-quantization "new" starts and "old" stops gracefully, as a deploy
    replaces it. Returns the job's history once it ended, checked by `assert_handed_over_once`."""
    old = start_in_thread(Dispatcher(sessions, executor(), settings, name="old"))
    new = None
    try:
        wait_for_quantizing(sessions, job_id)
        new = start_in_thread(Dispatcher(sessions, executor(), settings, name="new"))
        stop(old)  # graceful: the deploy replaces this dispatcher
        assert load_job(sessions, job_id).state == "running"
        job = wait_for_state(sessions, job_id, {"succeeded", "failed", "queued"}, timeout=180)
    finally:
        if new is not None:
            stop(new)
        stop(old)
    history = assert_handed_over_once(sessions, settings, job, "old", "new")
    states = [(e.state, e.attempt) for e in history if e.kind == "state"]
    assert states == [("queued", 0), ("running", 1), ("succeeded", 1)]
    return history


def test_a_dispatcher_stopping_mid_job_hands_its_attempt_to_another(
    database_url: str, allowed_root: Path, tiny_assets: dict, slow_model: Path, tmp_path: Path
) -> None:
    settings = service_settings(database_url, allowed_root, tmp_path, lease_seconds=3.0)
    sessions = sessions_for(database_url)
    job_id = submit(sessions, slow_body(tiny_assets, slow_model), settings)
    rolling_deploy(sessions, settings, job_id, lambda: ThreadExecutor(1))


def test_an_adopted_attempt_whose_worker_went_quiet_is_rescued(database_url: str) -> None:
    sessions = sessions_for(database_url)
    with transaction(sessions) as s:
        job_id = crud.create_job(s, owner="alice", spec={"model": "m"}, request_hash="h", max_attempts=3).id
    with transaction(sessions) as s:
        [claim] = claim_jobs(s, owner="old", limit=1, lease_seconds=30)
        assert hand_off(s, owner="old", attempts={job_id: claim.attempt}) == [job_id]
    with transaction(sessions) as s:
        assert adopt_leases(s, owner="new", lease_seconds=30) == {job_id: 1}
        assert adopt_leases(s, owner="other", lease_seconds=30) == {}  # adopted once
    # the worker stops beating: no more renewals, and the lease runs out into a rescue
    with transaction(sessions) as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
        assert renew_adopted(s, owner="new", attempts={job_id: 1}, lease_seconds=30) == set()
        s.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    with transaction(sessions) as s:
        assert rescue_expired(s, policy=RetryPolicy(0, 0)) == [(job_id, JobState.QUEUED)]
    assert load_job(sessions, job_id).attempts == 1


@pytest.mark.ray
def test_a_dispatcher_stopping_mid_job_leaves_its_ray_attempt_to_another(
    ray_cluster: None,
    clean_sqlite_url: str,
    allowed_root: Path,
    tiny_assets: dict,
    slow_model: Path,
    tmp_path: Path,
) -> None:
    """The same rolling deploy with the Ray executor: the attempt runs in a detached actor, which outlives
    the dispatcher that started it; the new dispatcher finds it by name, drains its reports from then on
    and records its success under attempt 1 (SQLite here; the next test does it across processes on
    PostgreSQL)."""
    from orchestrator.executors.ray_executor import RayExecutor

    settings = service_settings(clean_sqlite_url, allowed_root, tmp_path, executor="ray", lease_seconds=6.0)
    sessions = sessions_for(clean_sqlite_url)
    job_id = submit(sessions, slow_body(tiny_assets, slow_model), settings)
    history = rolling_deploy(sessions, settings, job_id, lambda: RayExecutor(capacity=1))
    messages = [e.message or "" for e in history if e.kind == "attempt"]
    assert len([m for m in messages if m == "attempt started"]) == 1  # one worker process, never restarted
    layers = [e.layer for e in history if e.kind == "progress" and e.stage == "quantize"]
    assert layers == list(range(8))  # all reported (drained by both)


@pytest.mark.ray
@pytest.mark.postgres
def test_a_dispatcher_process_stopping_leaves_its_ray_attempt_running_for_another(
    ray_cluster: None,
    clean_postgres_url: str,
    allowed_root: Path,
    tiny_assets: dict,
    slow_model: Path,
    tmp_path: Path,
) -> None:
    """A real rolling deploy: `quantfleet dispatcher --executor ray` in a process of its own (its own Ray
    driver, on this session's Ray) gets SIGTERM mid-job and exits; its attempt's actor outlives it (detached)
    and a dispatcher of this process adopts the lease, drains the actor and records the success."""
    import os
    import signal
    import subprocess
    import sys

    import ray

    from orchestrator.executors.ray_executor import RayExecutor

    settings = service_settings(clean_postgres_url, allowed_root, tmp_path, executor="ray", lease_seconds=6.0)
    sessions = sessions_for(clean_postgres_url)
    job_id = submit(sessions, slow_body(tiny_assets, slow_model), settings)
    env = {
        **os.environ,
        "QF_DATABASE_URL": clean_postgres_url,
        "QF_OBJECT_STORE": settings.object_store,
        "QF_ALLOWED_ROOTS": str(allowed_root),
        "QF_CACHE_DIR": str(settings.cache_dir),
        "QF_WORK_DIR": str(settings.work_dir),
        "QF_LEASE_SECONDS": "6",
        "QF_POLL_SECONDS": "0.1",
        "QF_CONCURRENCY": "1",
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
    }
    old = subprocess.Popen(
        [sys.executable, "-m", "quantfleet.cli", "dispatcher", "--executor", "ray", "--name", "old-process"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    new = None
    try:
        wait_for_quantizing(sessions, job_id, timeout=180)
        new = start_in_thread(Dispatcher(sessions, RayExecutor(capacity=1), settings, name="new"))
        old.send_signal(signal.SIGTERM)  # graceful: the deploy replaces this dispatcher
        assert old.wait(timeout=60) == 0
        job = wait_for_state(sessions, job_id, {"succeeded", "failed", "queued"}, timeout=180)
    finally:
        if old.poll() is None:
            old.kill()
        if new is not None:
            stop(new)
    history = assert_handed_over_once(sessions, settings, job, "old-process", "new")  # the actor outlived its process
    layers = [e.layer for e in history if e.kind == "progress" and e.stage == "quantize"]
    assert layers == list(range(8))
