"""Attempts and leases: claim queued jobs, keep their leases alive, record how each attempt ended, and
rescue jobs whose lease expired because a worker or dispatcher died.

Fencing: `jobs.attempts` is incremented by every claim and doubles as the fencing token. Every write an
attempt makes carries `WHERE attempts = :attempt AND state IN (running, cancelling)`, so a worker
whose lease was rescued (and whose job may already run again elsewhere) can no longer change the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from orchestrator.queue.crud import add_event
from orchestrator.queue.hooks import fire_finished
from orchestrator.queue.models import Artifact, Job, utcnow
from orchestrator.queue.states import ACTIVE, IllegalTransition, JobState, sources

ACTIVE_STATES = [s.value for s in ACTIVE]


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    spec: dict[str, Any]
    output_uri: str | None
    owner: str


@dataclass(frozen=True)
class RetryPolicy:
    backoff_seconds: float = 10.0
    backoff_max_seconds: float = 600.0

    def delay(self, attempt: int) -> timedelta:
        """Exponential backoff: base, 2·base, 4·base, ... capped."""
        return timedelta(
            seconds=min(self.backoff_seconds * 2 ** max(attempt - 1, 0), self.backoff_max_seconds)
        )


def _fenced(job_id: str, attempt: int) -> Any:
    return (Job.id == job_id) & (Job.attempts == attempt) & Job.state.in_(ACTIVE_STATES)


def claim_jobs(
    session: Session, *, owner: str, limit: int, lease_seconds: float, now: datetime | None = None
) -> list[Claim]:
    """Atomically move up to `limit` queued jobs to running, highest priority then oldest first.

    One statement on both databases: PostgreSQL locks the picked rows with FOR UPDATE SKIP LOCKED, so
    concurrent dispatchers pick disjoint jobs (the pick is a MATERIALIZED CTE: as a plain IN-subquery the
    planner may evaluate it more than once and claim more than `limit` rows); SQLite has no row locks (SQLAlchemy drops the clause) but
    serialises writers, so the single UPDATE ... RETURNING is atomic there too.
    """
    if limit <= 0:
        return []
    now = now or utcnow()
    picked = (
        select(Job.id)
        .where(Job.state == JobState.QUEUED.value, or_(Job.run_after.is_(None), Job.run_after <= now))
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("picked")
        .prefix_with("MATERIALIZED")  # evaluated exactly once: an IN (subquery) may be re-run by the planner
    )
    rows = session.execute(
        update(Job)
        .where(
            Job.id.in_(select(picked.c.id)),
            Job.state.in_(sources(JobState.RUNNING, among=[JobState.QUEUED])),
        )
        .values(
            state=JobState.RUNNING.value,
            attempts=Job.attempts + 1,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            run_after=None,
            started_at=now,
            error=None,
        )
        .returning(Job.id, Job.attempts, Job.spec, Job.output_uri, Job.owner)
        .execution_options(synchronize_session=False)
    ).all()
    claims = [Claim(r.id, r.attempts, r.spec, r.output_uri, r.owner) for r in rows]
    for c in claims:
        add_event(
            session, c.job_id, "state", c.attempt, state=JobState.RUNNING.value, data={"lease_owner": owner}
        )
    return claims


def _update_held(
    session: Session, owner: str, attempts: dict[str, int], values: dict[str, Any], *where: Any
) -> list[str]:
    """Set `values` on each job whose attempt is still current and whose lease `owner` holds (and that
    meets `where`); returns those job ids, in the order of `attempts`."""
    held = []
    for job_id, attempt in attempts.items():
        result = session.execute(
            update(Job)
            .where(_fenced(job_id, attempt), Job.lease_owner == owner, *where)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            held.append(job_id)
    return held


def renew_leases(
    session: Session,
    *,
    owner: str,
    attempts: dict[str, int],
    lease_seconds: float,
    now: datetime | None = None,
) -> set[str]:
    """Extend the leases this dispatcher holds; returns the job ids whose lease it still holds."""
    now = now or utcnow()
    values = {"lease_expires_at": now + timedelta(seconds=lease_seconds), "heartbeat_at": now}
    return set(_update_held(session, owner, attempts, values))


def hand_off(session: Session, *, owner: str, attempts: dict[str, int]) -> list[str]:
    """A dispatcher that stops while its attempts keep running gives their leases up for adoption
    (lease_owner NULL, the expiry unchanged): the attempt keeps its number, nothing is failed. Returns the
    job ids handed off (those whose lease this dispatcher still held)."""
    handed = _update_held(session, owner, attempts, {"lease_owner": None})
    for job_id in handed:
        attempt = attempts[job_id]
        add_event(
            session,
            job_id,
            "attempt",
            attempt,
            message=f"dispatcher {owner} stopped; attempt {attempt} keeps running, its lease is up for adoption",
            data={"handed_off_by": owner},
        )
    return handed


def adopt_leases(
    session: Session, *, owner: str, lease_seconds: float, now: datetime | None = None
) -> dict[str, int]:
    """Take over the leases of running attempts whose dispatcher handed them off and whose worker is alive
    (its heartbeat is younger than a lease); returns job id -> attempt of the adopted ones. A lease that
    expired first is left to rescue_expired."""
    now = now or utcnow()
    rows = session.execute(
        select(Job.id, Job.attempts)
        .where(
            Job.state.in_(ACTIVE_STATES),
            Job.lease_owner.is_(None),
            Job.lease_expires_at >= now,
            Job.heartbeat_at >= now - timedelta(seconds=lease_seconds),
        )
        .with_for_update(skip_locked=True)
    ).all()
    adopted = {}
    for row in rows:
        result = session.execute(
            update(Job)
            .where(_fenced(row.id, row.attempts), Job.lease_owner.is_(None))
            .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            add_event(
                session,
                row.id,
                "attempt",
                row.attempts,
                message=f"dispatcher {owner} adopted the lease of attempt {row.attempts}",
                data={"lease_owner": owner},
            )
            adopted[row.id] = row.attempts
    return adopted


def renew_adopted(
    session: Session,
    *,
    owner: str,
    attempts: dict[str, int],
    lease_seconds: float,
    now: datetime | None = None,
) -> set[str]:
    """Extend adopted leases while their worker is alive: heartbeat_at is written from the worker's own
    heartbeat reports (orchestrator.queue.attempt, recorded by whichever dispatcher receives them), so a
    worker that died stops being renewed and its lease expires into a rescue. Returns the job ids still
    held."""
    now = now or utcnow()
    values = {"lease_expires_at": now + timedelta(seconds=lease_seconds)}
    alive = Job.heartbeat_at >= now - timedelta(seconds=lease_seconds)
    return set(_update_held(session, owner, attempts, values, alive))


def worker_heartbeat(session: Session, job_id: str, attempt: int, now: datetime | None = None) -> bool:
    """The attempt's worker says it is alive; False once the attempt was fenced off."""
    result = session.execute(
        update(Job)
        .where(_fenced(job_id, attempt))
        .values(heartbeat_at=now or utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def current_state(session: Session, job_id: str, attempt: int) -> JobState | None:
    """State of the job if `attempt` still holds it; None if the attempt was fenced off."""
    state = session.scalar(select(Job.state).where(_fenced(job_id, attempt)))
    return JobState(state) if state else None


def start_attempt(session: Session, job_id: str, attempt: int, data: dict[str, Any]) -> JobState | None:
    """Record where the attempt runs (host, pid: what an operator needs to find or kill it)."""
    state = current_state(session, job_id, attempt)
    if state is not None:
        add_event(session, job_id, "attempt", attempt, message="attempt started", data=data)
    return state


def record_progress(
    session: Session, job_id: str, attempt: int, progress: dict[str, Any], *, event: bool
) -> JobState | None:
    """Store the latest progress (and an event when the stage or layer changed); returns the state the
    job is in (cancelling tells the worker to stop) or None if the attempt was fenced off."""
    result = session.execute(
        update(Job)
        .where(_fenced(job_id, attempt))
        .values(progress=progress)
        .returning(Job.state)
        .execution_options(synchronize_session=False)
    ).first()
    if result is None:
        return None
    if event:
        add_event(
            session,
            job_id,
            "progress",
            attempt,
            stage=progress.get("stage"),
            layer=progress.get("layer"),
            num_layers=progress.get("num_layers"),
            message=progress.get("message"),
        )
    return JobState(result.state)


def _finish(
    session: Session, job_id: str, attempt: int, state: JobState, message: str, **values: Any
) -> bool:
    """End the attempt's job in the terminal `state`; False if fenced off or not in a state that may."""
    if not state.is_terminal:
        raise IllegalTransition(f"an attempt ends its job in a terminal state, not {state.value}")
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(_fenced(job_id, attempt), Job.state.in_(sources(state, among=ACTIVE)))
        .values(state=state.value, lease_owner=None, lease_expires_at=None, finished_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_event(session, job_id, "state", attempt, state=state.value, message=message)
    return True


def succeed_attempt(
    session: Session,
    job_id: str,
    attempt: int,
    *,
    result: dict[str, Any],
    output_uri: str,
    artifacts: list[dict[str, Any]],
) -> bool:
    """running|cancelling → succeeded with the engine report and artifacts (one transaction)."""
    done = _finish(
        session,
        job_id,
        attempt,
        JobState.SUCCEEDED,
        "succeeded",
        result=result,
        output_uri=output_uri,
        error=None,
    )
    if not done:
        return False
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    session.add_all(Artifact(job_id=job_id, created_at=utcnow(), **a) for a in artifacts)
    session.flush()
    fire_finished(session, job_id)  # subscribers (quality gate, webhook outbox) in this same transaction
    return True


def cancel_attempt(session: Session, job_id: str, attempt: int) -> bool:
    """The worker stopped at a layer boundary after a cancel request: cancelling → cancelled."""
    return _finish(session, job_id, attempt, JobState.CANCELLED, "stopped at a layer boundary")


def fail_attempt(
    session: Session,
    job_id: str,
    attempt: int,
    *,
    error: str,
    retryable: bool,
    policy: RetryPolicy,
    now: datetime | None = None,
) -> JobState | None:
    """End a failed attempt: back to queued after a backoff while attempts remain (and the error is worth
    retrying), else failed with the reason. A job being cancelled ends cancelled. None if fenced off."""
    now = now or utcnow()
    row = session.execute(select(Job.state, Job.max_attempts).where(_fenced(job_id, attempt))).first()
    if row is None:
        return None
    if row.state == JobState.CANCELLING.value:
        return JobState.CANCELLED if _finish(session, job_id, attempt, JobState.CANCELLED, error) else None
    if not retryable or attempt >= row.max_attempts:
        reason = error if not retryable else f"{error} (gave up after {attempt} attempts)"
        if not _finish(session, job_id, attempt, JobState.FAILED, reason, error=reason):
            return None
        fire_finished(session, job_id)  # subscribers (webhook outbox) in this same transaction
        return JobState.FAILED
    result = session.execute(
        update(Job)
        .where(_fenced(job_id, attempt), Job.state.in_(sources(JobState.QUEUED, among=ACTIVE)))
        .values(
            state=JobState.QUEUED.value,
            lease_owner=None,
            lease_expires_at=None,
            run_after=now + policy.delay(attempt),
            error=error,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    add_event(session, job_id, "state", attempt, state=JobState.QUEUED.value, message=f"retrying: {error}")
    return JobState.QUEUED


def rescue_expired(
    session: Session, *, policy: RetryPolicy, now: datetime | None = None
) -> list[tuple[str, JobState]]:
    """Jobs whose attempt stopped heartbeating (worker or dispatcher died) get their attempt failed as
    retryable; returns (job id, new state) for each rescued job."""
    now = now or utcnow()
    expired = session.execute(
        select(Job.id, Job.attempts, Job.lease_owner)
        .where(Job.state.in_(ACTIVE_STATES), Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at)
        .with_for_update(skip_locked=True)
    ).all()
    rescued = []
    for row in expired:
        error = f"attempt {row.attempts} lost its lease (held by {row.lease_owner}); its worker or dispatcher stopped"
        new_state = fail_attempt(
            session, row.id, row.attempts, error=error, retryable=True, policy=policy, now=now
        )
        if new_state is not None:
            rescued.append((row.id, new_state))
    return rescued
