"""PostgreSQL: a submit's owner lock, its capped insert and its commit sent to the server as one pipeline.

The statements travel in one round trip and the server runs them back to back: the owner's advisory lock
(held to the commit), then one statement that counts the owner's queued and running jobs and inserts the
job, its labels and its first event only if the count is below the cap, then COMMIT, then a second
transaction that makes the first durable before the call returns (see `_statements`). The count is that
statement's own snapshot, taken after the lock was granted (READ COMMITTED: one snapshot per statement), so
racing submits of one owner see each other's committed jobs exactly as when the statements were sent one at a
time. The lock is held only while the server runs the insert, never across a round trip to the API process
or a disk flush: that is what bounds the submit rate of a single owner.

The statements go through the driver (psycopg's pipeline mode, which SQLAlchemy's execute does not use) on a
connection checked out of the engine's pool (pinged as usual); errors come back as SQLAlchemy's exceptions
(a duplicate Idempotency-Key as IntegrityError, a lost connection as OperationalError with the connection
invalidated), with no statement parameters in them, like every other statement of the service.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from orchestrator.queue.models import Job
from orchestrator.queue.states import CAPPED_STATES

LOCK_OWNER = "SELECT pg_advisory_xact_lock(hashtext(%(key)s))"

INSERT_WITHIN_CAP = """
WITH job AS (
    INSERT INTO jobs (id, owner, api_key_id, idempotency_key, request_hash, spec, state, priority, attempts,
                      max_attempts, plan, created_at, updated_at)
    SELECT %(id)s::varchar, %(owner)s::varchar, %(api_key_id)s::varchar, %(idempotency_key)s::varchar,
           %(request_hash)s::varchar, %(spec)s::json, %(state)s::varchar, %(priority)s::integer, 0,
           %(max_attempts)s::integer, %(plan)s::json, %(now)s::timestamp, %(now)s::timestamp
    WHERE (SELECT count(*) FROM jobs WHERE owner = %(owner)s::varchar AND state = ANY(%(active)s::varchar[]))
          < %(cap)s::bigint
    RETURNING id
), labels AS (
    INSERT INTO job_labels (job_id, key, value)
    SELECT job.id, label.key, label.value FROM job CROSS JOIN json_each_text(%(labels)s::json) AS label
), event AS (
    INSERT INTO job_events (job_id, at, kind, attempt, state, message)
    SELECT job.id, %(now)s::timestamp, 'state', 0, %(state)s::varchar, 'submitted' FROM job
)
SELECT count(*) FROM job
"""


FLUSH = "SELECT pg_logical_emit_message(true, 'quantfleet.flush', '')"


def owner_lock_key(owner: str) -> str:
    """What the owner's advisory lock is keyed by (hashed by the server), on every path that takes it."""
    return f"quantfleet.owner:{owner}"


def _parameters(job: Job, cap: int, now: datetime) -> dict[str, Any]:
    return {
        "id": job.id,
        "owner": job.owner,
        "api_key_id": job.api_key_id,
        "idempotency_key": job.idempotency_key,
        "request_hash": job.request_hash,
        "spec": json.dumps(job.spec),
        "state": job.state,
        "priority": job.priority,
        "max_attempts": job.max_attempts,
        "plan": json.dumps(job.plan),  # None as JSON null, as the ORM stores it
        "now": now.replace(tzinfo=None),  # stored as naive UTC (models.UTCDateTime)
        "active": CAPPED_STATES,
        "cap": cap,
        "labels": json.dumps({label.key: label.value for label in job.labels}),
    }


def insert_committed(engine: Engine, job: Job, cap: int, now: datetime) -> bool:
    """Lock `job.owner`, insert `job` (a transient row: its labels, and its first event) if the owner has
    fewer than `cap` queued and running jobs, and commit; returns once the commit is on disk (as durable as
    the server's synchronous_commit makes any commit). True: inserted; False: the owner is at the cap,
    nothing was written."""
    with engine.connect() as connection:  # checked out of the pool and pinged; refused: OperationalError
        pooled = connection.connection
        driver: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
        try:
            driver.autocommit = True  # the transactions are spelled out below, in one pipeline
            with driver.pipeline():
                for statement, parameters in _statements(job, cap, now):
                    cursor = driver.execute(statement, parameters)
                    if statement is INSERT_WITHIN_CAP:
                        inserted = cursor
            row = inserted.fetchone()
            driver.autocommit = False
        except psycopg.Error as e:
            lost = engine.dialect.is_disconnect(e, pooled, None)  # type: ignore[arg-type]
            if not lost:
                try:
                    driver.rollback()  # the transaction a failed statement left open
                    driver.autocommit = False
                except psycopg.Error:
                    lost = True
            if lost:
                connection.invalidate(e)  # a broken connection never goes back to the pool
            raise DBAPIError.instance(
                INSERT_WITHIN_CAP,
                None,
                e,
                psycopg.Error,
                hide_parameters=True,
                connection_invalidated=lost,
                dialect=engine.dialect,
            ) from e
    return bool(row and row[0])


def _statements(job: Job, cap: int, now: datetime) -> list[tuple[str, dict[str, Any] | None]]:
    """What one submit sends, in one round trip.

    The job's transaction commits without waiting for its WAL to reach the disk (synchronous_commit off for
    it alone): its job is visible and the owner's lock free as soon as the server ran it, so the next submit
    of the owner waits for that insert, not for a disk flush. Then a second transaction, which only takes a
    transaction id (so that it writes a commit record), commits the server's usual way: it returns once the
    WAL up to its own commit record is on disk, and WAL is written in order, so the job's commit before it
    is too. The API answers only after that: a job is durable before its 202, and concurrent submits' disk
    flushes are shared (group commit) instead of taken one after the other under the owner's lock."""
    return [
        ("BEGIN", None),
        ("SET LOCAL synchronous_commit = off", None),
        (LOCK_OWNER, {"key": owner_lock_key(job.owner)}),
        (INSERT_WITHIN_CAP, _parameters(job, cap, now)),
        ("COMMIT", None),
        (FLUSH, None),  # its own (implicit) transaction, committed at the pipeline's end
    ]
