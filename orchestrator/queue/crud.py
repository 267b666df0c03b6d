"""Job records as the API sees them: create, find, list, cancel, read events and artifacts.

Every function takes an open Session inside a transaction (see orchestrator.db.transaction); state
changes are conditional UPDATEs, so a cancel racing a claim can never be lost or applied twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db import transaction
from orchestrator.queue import pg_submit
from orchestrator.queue.models import Artifact, Job, JobEvent, JobLabel, utcnow
from orchestrator.queue.scoping import newest_first_page, owned_by
from orchestrator.queue.states import CAPPED_STATES, JobState, check_transition


def add_event(session: Session, job_id: str, kind: str, attempt: int, **fields: Any) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, attempt=attempt, at=utcnow(), **fields))


class OwnerCapReached(Exception):
    """create_job(within_cap=...) or submit_job found the owner already at the cap of queued and running jobs."""


def new_job(
    *,
    owner: str,
    spec: dict[str, Any],
    request_hash: str,
    max_attempts: int,
    priority: int = 0,
    labels: dict[str, str] | None = None,
    idempotency_key: str | None = None,
    api_key_id: str | None = None,
    plan: dict[str, Any] | None = None,
) -> Job:
    """A queued job with its labels, not yet added to any session."""
    return Job(
        id=uuid.uuid4().hex,
        owner=owner,
        api_key_id=api_key_id,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        spec=spec,
        state=JobState.QUEUED.value,
        priority=priority,
        attempts=0,
        max_attempts=max_attempts,
        labels=[JobLabel(key=k, value=v) for k, v in sorted((labels or {}).items())],
        plan=plan,
    )


def create_job(session: Session, *, within_cap: int | None = None, **fields: Any) -> Job:
    """Insert a queued job (`new_job`'s fields) with its labels and first event. `within_cap`: only if the
    owner has fewer queued and running jobs than that (OwnerCapReached otherwise); call lock_owner first in
    the same transaction, so the count and the insert are one step per owner."""
    job = new_job(**fields)
    if within_cap is not None and count_active_jobs(session, job.owner) >= within_cap:
        raise OwnerCapReached(job.owner)
    session.add(job)
    session.flush()
    add_event(session, job.id, "state", 0, state=JobState.QUEUED.value, message="submitted")
    return job


def submit_job(sessions: sessionmaker[Session], *, cap: int, **fields: Any) -> Job:
    """Insert a queued job (`new_job`'s fields) with its labels and first event, and commit it, if its owner
    has fewer than `cap` queued and running jobs (OwnerCapReached otherwise). Counted and inserted in one
    step per owner, so racing submits cannot pass the cap. Returns the job as committed, outside any session.

    PostgreSQL: the owner's lock, the insert and the commit in one round trip (orchestrator.queue.pg_submit),
    what bounds the submit rate of the API. Otherwise (SQLite, one writer at a time): through the ORM."""
    engine = sessions.kw["bind"]
    if engine.dialect.name == "postgresql":
        job, now = new_job(**fields), utcnow()
        if not pg_submit.insert_committed(engine, job, cap, now):
            raise OwnerCapReached(job.owner)
        job.created_at = job.updated_at = now  # the row as stored
        return job
    with transaction(sessions) as session:
        lock_owner(session, fields["owner"])
        return create_job(session, within_cap=cap, **fields)


def find_by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.owner == owner, Job.idempotency_key == key)).one_or_none()


def lock_owner(session: Session, owner: str) -> None:
    """Serialise this transaction, until it ends, with every other that locks the same owner, so that a
    per-owner limit is counted and used in one step (racing submits cannot both see room for one more).
    PostgreSQL: a transaction-level advisory lock keyed by the owner's name. SQLite needs none: every
    transaction begins IMMEDIATE there (orchestrator.db), one writer at a time."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection().exec_driver_sql(pg_submit.LOCK_OWNER, {"key": pg_submit.owner_lock_key(owner)})


def count_active_jobs(session: Session, owner: str) -> int:
    return session.scalar(select(func.count()).where(Job.owner == owner, Job.state.in_(CAPPED_STATES))) or 0


def list_jobs(
    session: Session,
    *,
    owner: str | None,
    states: Sequence[str] = (),
    labels: dict[str, str] | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Job], str | None]:
    """Newest first; keyset pagination on (created_at, id), so pages stay stable while jobs are added."""
    query = owned_by(select(Job), Job, owner)
    if states:
        query = query.where(Job.state.in_(list(states)))
    for key, value in (labels or {}).items():
        query = query.where(
            exists().where(JobLabel.job_id == Job.id, JobLabel.key == key, JobLabel.value == value)
        )
    return newest_first_page(session, query, Job, limit=limit, cursor=cursor)


def request_cancel(session: Session, job: Job) -> Job:
    """queued → cancelled at once; running → cancelling (the worker stops at its next layer boundary).
    Cancelling a job that is already cancelling or finished changes nothing."""
    for _ in range(5):  # the job may move between our read and our conditional write; re-read and retry
        session.refresh(job)
        state = JobState(job.state)
        if state is JobState.QUEUED:
            target, extra = JobState.CANCELLED, {"finished_at": utcnow(), "run_after": None}
        elif state is JobState.RUNNING:
            target, extra = JobState.CANCELLING, {}
        else:
            return job
        check_transition(state, target)
        done = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == state.value)
            .values(state=target.value, **extra)
            .execution_options(synchronize_session=False)
        )
        if done.rowcount == 1:  # type: ignore[attr-defined]
            add_event(session, job.id, "state", job.attempts, state=target.value, message="cancel requested")
            session.flush()
            session.refresh(job)
            return job
    raise RuntimeError(f"job {job.id} kept changing state while being cancelled; try again")


def list_events(session: Session, job_id: str, *, after: int = 0, limit: int = 500) -> list[JobEvent]:
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
    return list(session.scalars(query.order_by(JobEvent.id).limit(limit)))


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.path)))
