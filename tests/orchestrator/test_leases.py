"""Claims, leases, fencing, retries and rescue against SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db import make_engine, session_factory, transaction
from orchestrator.queue import crud
from orchestrator.queue.leases import (
    RetryPolicy,
    cancel_attempt,
    claim_jobs,
    fail_attempt,
    record_progress,
    renew_leases,
    rescue_expired,
    succeed_attempt,
)
from orchestrator.queue.models import Artifact, Job, JobEvent, utcnow
from orchestrator.queue.states import JobState
from tests.orchestrator.support import sessions_for

POLICY = RetryPolicy(backoff_seconds=30, backoff_max_seconds=60)


def add_job(
    sessions: sessionmaker[Session], *, priority: int = 0, max_attempts: int = 3, name: str = "j"
) -> str:
    with transaction(sessions) as s:
        job = crud.create_job(
            s,
            owner="alice",
            spec={"name": name},
            request_hash=name,
            max_attempts=max_attempts,
            priority=priority,
        )
        return job.id


def job(sessions: sessionmaker[Session], job_id: str) -> Job:
    with transaction(sessions) as s:
        found = s.get(Job, job_id)
        assert found is not None
        return found


def claim(sessions: sessionmaker[Session], owner: str = "d1", limit: int = 10, lease: float = 60, now=None):
    with transaction(sessions) as s:
        return claim_jobs(s, owner=owner, limit=limit, lease_seconds=lease, now=now)


def test_claims_by_priority_then_age_and_starts_an_attempt(database_url: str) -> None:
    sessions = sessions_for(database_url)
    low = add_job(sessions, priority=0, name="low")
    high = add_job(sessions, priority=5, name="high")
    later_low = add_job(sessions, priority=0, name="later")
    first = claim(sessions, limit=2)
    assert [c.job_id for c in sorted(first, key=lambda c: c.spec["name"])] == [high, low]
    assert {c.attempt for c in first} == {1}
    assert [c.job_id for c in claim(sessions)] == [later_low]
    assert claim(sessions) == []
    claimed = job(sessions, high)
    assert (claimed.state, claimed.attempts, claimed.lease_owner) == ("running", 1, "d1")
    assert claimed.lease_expires_at is not None and claimed.lease_expires_at > utcnow() + timedelta(
        seconds=50
    )
    with transaction(sessions) as s:
        states = s.scalars(select(JobEvent.state).where(JobEvent.job_id == high).order_by(JobEvent.id)).all()
    assert states == ["queued", "running"]


def test_concurrent_claimers_never_share_a_job(database_url: str) -> None:
    sessions = sessions_for(database_url)
    ids = {add_job(sessions, name=str(i)) for i in range(40)}
    got: list[list[str]] = [[] for _ in range(4)]

    def claimer(i: int) -> None:
        engine = make_engine(database_url)  # its own connection pool, like a separate dispatcher
        mine = session_factory(engine)
        while batch := claim(mine, owner=f"d{i}", limit=3):
            got[i].extend(c.job_id for c in batch)
        engine.dispose()

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [j for part in got for j in part]
    assert sorted(everything) == sorted(ids)  # each job exactly once
    with transaction(sessions) as s:
        assert set(s.scalars(select(Job.attempts)).all()) == {1}


def test_stale_attempt_is_fenced_off_after_rescue(database_url: str) -> None:
    sessions = sessions_for(database_url)
    job_id = add_job(sessions)
    [first] = claim(sessions, owner="dead", lease=5)
    later = utcnow() + timedelta(seconds=10)
    with transaction(sessions) as s:
        assert rescue_expired(s, policy=RetryPolicy(0, 0), now=later) == [(job_id, JobState.QUEUED)]
    [second] = claim(sessions, owner="alive", now=later)
    assert (first.attempt, second.attempt) == (1, 2)
    with transaction(sessions) as s:
        assert record_progress(s, job_id, 1, {"stage": "quantize"}, event=True) is None
        assert renew_leases(s, owner="dead", attempts={job_id: 1}, lease_seconds=60) == set()
        assert not succeed_attempt(s, job_id, 1, result={"stale": True}, output_uri="x", artifacts=[])
        assert (
            record_progress(s, job_id, 2, {"stage": "quantize", "layer": 0}, event=True) is JobState.RUNNING
        )
        artifact = {"path": "manifest.json", "uri": "u", "kind": "manifest", "sha256": "0" * 64, "bytes": 3}
        assert succeed_attempt(s, job_id, 2, result={"fresh": True}, output_uri="out", artifacts=[artifact])
    done = job(sessions, job_id)
    assert (done.state, done.result, done.lease_owner, done.error) == (
        "succeeded",
        {"fresh": True},
        None,
        None,
    )
    with transaction(sessions) as s:
        assert s.scalars(select(Artifact.path).where(Artifact.job_id == job_id)).all() == ["manifest.json"]
        progress = s.scalars(select(JobEvent.attempt).where(JobEvent.kind == "progress")).all()
    assert progress == [2]  # the fenced attempt wrote nothing


def test_failed_attempt_backs_off_then_gives_up(database_url: str) -> None:
    sessions = sessions_for(database_url)
    job_id = add_job(sessions, max_attempts=2)
    [c1] = claim(sessions)
    now = utcnow()
    with transaction(sessions) as s:
        assert (
            fail_attempt(s, job_id, 1, error="boom", retryable=True, policy=POLICY, now=now)
            is JobState.QUEUED
        )
    queued = job(sessions, job_id)
    assert queued.state == "queued" and queued.error == "boom"
    assert queued.run_after == now + timedelta(seconds=30)
    assert claim(sessions, now=now + timedelta(seconds=29)) == []  # still backing off
    [c2] = claim(sessions, now=now + timedelta(seconds=31))
    assert c2.attempt == 2
    with transaction(sessions) as s:
        assert (
            fail_attempt(s, job_id, 2, error="boom again", retryable=True, policy=POLICY) is JobState.FAILED
        )
    failed = job(sessions, job_id)
    assert failed.state == "failed" and failed.error == "boom again (gave up after 2 attempts)"
    assert failed.finished_at is not None


def test_backoff_doubles_and_is_capped() -> None:
    assert [POLICY.delay(a).total_seconds() for a in (1, 2, 3)] == [30, 60, 60]


def test_input_errors_fail_without_retry(database_url: str) -> None:
    sessions = sessions_for(database_url)
    job_id = add_job(sessions, max_attempts=3)
    claim(sessions)
    with transaction(sessions) as s:
        state = fail_attempt(s, job_id, 1, error="model has no config.json", retryable=False, policy=POLICY)
    assert state is JobState.FAILED
    assert job(sessions, job_id).error == "model has no config.json"


def test_cancel_queued_and_running_jobs(database_url: str) -> None:
    sessions = sessions_for(database_url)
    queued_id, running_id = add_job(sessions, priority=0), add_job(sessions, priority=9)
    claim(sessions, limit=1)
    with transaction(sessions) as s:
        assert crud.request_cancel(s, s.get(Job, queued_id)).state == "cancelled"
        assert crud.request_cancel(s, s.get(Job, running_id)).state == "cancelling"
        assert crud.request_cancel(s, s.get(Job, running_id)).state == "cancelling"  # idempotent
    assert claim(sessions) == []  # the cancelled job is never claimed
    with transaction(sessions) as s:
        assert record_progress(s, running_id, 1, {"stage": "quantize"}, event=False) is JobState.CANCELLING
        assert cancel_attempt(s, running_id, 1)
    assert job(sessions, running_id).state == "cancelled"


def test_expired_lease_of_a_cancelling_job_ends_cancelled(database_url: str) -> None:
    sessions = sessions_for(database_url)
    job_id = add_job(sessions)
    claim(sessions, lease=1)
    with transaction(sessions) as s:
        crud.request_cancel(s, s.get(Job, job_id))
        rescued = rescue_expired(s, policy=POLICY, now=utcnow() + timedelta(seconds=5))
    assert rescued == [(job_id, JobState.CANCELLED)]


def test_renewal_keeps_a_lease_alive(database_url: str) -> None:
    sessions = sessions_for(database_url)
    job_id = add_job(sessions)
    claim(sessions, owner="d1", lease=5)
    with transaction(sessions) as s:
        assert renew_leases(s, owner="someone-else", attempts={job_id: 1}, lease_seconds=60) == set()
        assert renew_leases(s, owner="d1", attempts={job_id: 1}, lease_seconds=60) == {job_id}
        assert rescue_expired(s, policy=POLICY, now=utcnow() + timedelta(seconds=30)) == []
