"""The state machine of orchestrator/queue/states.py is enforced: every state change of the queue is a
conditional UPDATE built from its table, so asking for a transition it does not allow raises, and a row in
a state that may not make the move is left unchanged."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db import transaction
from orchestrator.queue import crud
from orchestrator.queue.leases import RetryPolicy, _finish, claim_jobs, fail_attempt, succeed_attempt
from orchestrator.queue.models import Job
from orchestrator.queue.states import (
    ACTIVE,
    TRANSITIONS,
    IllegalTransition,
    JobState,
    check_transition,
    sources,
)
from tests.orchestrator.support import events, load_job, sessions_for


def test_every_pair_is_allowed_or_raises() -> None:
    for old in JobState:
        for new in JobState:
            if new in TRANSITIONS[old]:
                check_transition(old, new)
            else:
                with pytest.raises(IllegalTransition, match=f"a {old.value} job cannot become {new.value}"):
                    check_transition(old, new)
    assert sources(JobState.SUCCEEDED, among=ACTIVE) == ["cancelling", "running"]
    assert sources(JobState.FAILED, among=ACTIVE) == ["running"]  # a cancel request wins over a failure
    with pytest.raises(IllegalTransition):
        sources(JobState.RUNNING, among=[JobState.SUCCEEDED, JobState.CANCELLED])


def _running_job(sessions: sessionmaker[Session], max_attempts: int = 3) -> str:
    with transaction(sessions) as s:
        job_id = crud.create_job(
            s, owner="a", spec={"model": "m"}, request_hash="h", max_attempts=max_attempts
        ).id
    with transaction(sessions) as s:
        assert [c.job_id for c in claim_jobs(s, owner="d", limit=1, lease_seconds=30)] == [job_id]
    return job_id


def test_an_illegal_transition_raises_and_changes_nothing(database_url: str) -> None:
    sessions = sessions_for(database_url)
    job_id = _running_job(sessions)
    with pytest.raises(IllegalTransition), transaction(sessions) as s:
        _finish(s, job_id, 1, JobState.RUNNING, "running again")  # no active state may become running
    with pytest.raises(IllegalTransition), transaction(sessions) as s:
        _finish(s, job_id, 1, JobState.QUEUED, "finished as queued")  # an end is terminal
    assert load_job(sessions, job_id).state == "running"
    assert [e.state for e in events(sessions, job_id) if e.kind == "state"] == ["queued", "running"]


def test_a_row_in_a_state_that_may_not_move_is_left_alone(database_url: str) -> None:
    sessions = sessions_for(database_url)
    job_id = _running_job(sessions, max_attempts=1)
    with transaction(sessions) as s:
        assert crud.request_cancel(s, s.get(Job, job_id)).state == "cancelling"
    with transaction(sessions) as s:  # cancelling → failed is not in the table: the UPDATE matches nothing
        assert _finish(s, job_id, 1, JobState.FAILED, "lost", error="lost") is False
    assert load_job(sessions, job_id).state == "cancelling"
    with transaction(sessions) as s:  # what a failed attempt of a cancelling job does: cancelled
        state = fail_attempt(s, job_id, 1, error="x", retryable=True, policy=RetryPolicy(0, 0))
        assert state is JobState.CANCELLED
    with transaction(sessions) as s:  # finished: nothing moves it any more
        assert not succeed_attempt(s, job_id, 1, result={}, output_uri="u", artifacts=[])
        assert crud.request_cancel(s, s.get(Job, job_id)).state == "cancelled"
    assert [e.state for e in events(sessions, job_id) if e.kind == "state"] == [
        "queued",
        "running",
        "cancelling",
        "cancelled",
    ]
