"""The migrations are the schema: after `upgrade head`, autogenerate finds nothing left to do."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from orchestrator.db import make_engine, migrate, migration_status
from orchestrator.queue.models import Base


def test_migrated_schema_equals_models(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    assert set(inspect(engine).get_table_names()) >= {
        "jobs",
        "job_events",
        "job_labels",
        "artifacts",
        "api_keys",
        "schedules",
        "schedule_fires",
        "batches",
        "webhooks",
        "webhook_deliveries",
        "webhook_attempts",
        "registrations",
    }
    current, head = migration_status(engine)
    assert current == head == "0004"
    engine.dispose()


def test_fresh_database_is_not_current_until_migrated(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    engine = make_engine(url)
    assert migration_status(engine) == (None, "0004")
    migrate(url)
    assert migration_status(engine) == ("0004", "0004")
    migrate(url)  # idempotent
    engine.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    migrate(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    engine.dispose()
