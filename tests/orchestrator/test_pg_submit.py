"""PostgreSQL submits (orchestrator/queue/pg_submit.py): one round trip, and durable when they return.

The job's own transaction commits without waiting for the disk (so the owner's lock is held only while the
server runs the insert); a second transaction that writes WAL then commits the server's usual way. These
tests check what that must guarantee: when crud.submit_job returns, the WAL up to the job's commit is on disk;
the job, its label and its first event are there; at the cap nothing is written; a duplicate
Idempotency-Key is an IntegrityError and leaves the pooled connection usable."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from orchestrator.db import transaction
from orchestrator.queue import crud, pg_submit
from orchestrator.queue.models import Job, JobEvent, JobLabel
from tests.orchestrator.support import sessions_for

pytestmark = pytest.mark.postgres

FIELDS: dict[str, Any] = {"spec": {"model": "m"}, "request_hash": "h", "max_attempts": 3}


def test_the_job_is_on_disk_when_the_submit_returns(
    clean_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = sessions_for(clean_postgres_url)
    with transaction(sessions) as s:
        s.execute(text("CREATE UNLOGGED TABLE IF NOT EXISTS wal_probe (lsn pg_lsn)"))
        s.execute(text("TRUNCATE wal_probe"))
    statements = pg_submit._statements

    def probed(*args: Any) -> list[tuple[str, dict[str, Any] | None]]:
        sent = statements(*args)  # [..., COMMIT, FLUSH]: note where the WAL was right after the job's commit
        # (in an unlogged table: the probe itself writes no WAL, so it forces no flush)
        return [*sent[:-1], ("INSERT INTO wal_probe SELECT pg_current_wal_insert_lsn()", None), sent[-1]]

    monkeypatch.setattr(pg_submit, "_statements", probed)
    try:
        for _ in range(20):
            crud.submit_job(sessions, owner="alice", cap=1000, **FIELDS)
            with transaction(sessions) as s:
                on_disk = s.scalar(
                    text("SELECT pg_current_wal_flush_lsn() >= max(lsn) FROM wal_probe")
                )
            assert on_disk is True
    finally:
        with transaction(sessions) as s:
            s.execute(text("DROP TABLE wal_probe"))


def test_the_job_its_label_and_first_event_are_inserted_below_the_cap_and_nothing_at_it(
    clean_postgres_url: str,
) -> None:
    sessions = sessions_for(clean_postgres_url)
    job = crud.submit_job(sessions, owner="alice", cap=1, labels={"team": "nlp"}, **FIELDS)
    assert job.state == "queued" and job.created_at is not None
    with pytest.raises(crud.OwnerCapReached):
        crud.submit_job(sessions, owner="alice", cap=1, labels={"team": "nlp"}, **FIELDS)
    with transaction(sessions) as s:
        assert s.scalars(select(Job.id)).all() == [job.id]
        assert s.execute(select(JobLabel.key, JobLabel.value)).all() == [("team", "nlp")]
        events = s.execute(select(JobEvent.kind, JobEvent.state, JobEvent.message)).all()
        assert events == [("state", "queued", "submitted")]


def test_a_duplicate_idempotency_key_is_an_integrity_error_and_the_pool_stays_usable(
    clean_postgres_url: str,
) -> None:
    sessions = sessions_for(clean_postgres_url)
    crud.submit_job(sessions, owner="alice", cap=1000, idempotency_key="k1", **FIELDS)
    for _ in range(3):  # each on a pooled connection, which must go back to the pool clean
        with pytest.raises(IntegrityError):
            crud.submit_job(sessions, owner="alice", cap=1000, idempotency_key="k1", **FIELDS)
    crud.submit_job(sessions, owner="alice", cap=1000, idempotency_key="k2", **FIELDS)
    with transaction(sessions) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 2
        assert s.scalar(select(func.count()).select_from(JobEvent)) == 2
