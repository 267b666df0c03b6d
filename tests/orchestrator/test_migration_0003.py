"""Migration 0003 drops the stored receiver response bodies of webhook attempts, on SQLite and PostgreSQL:
the attempts themselves (status, timing, error) survive, and a downgrade round-trips."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text

from orchestrator.db import _alembic_config, make_engine, migrate, migration_status
from tests.conftest import POSTGRES_ADMIN_URL, _psycopg_dsn


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own (the shared test databases are already at head)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    import psycopg

    name = f"qf_test_0003_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_psycopg_dsn(POSTGRES_ADMIN_URL), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(_psycopg_dsn(POSTGRES_ADMIN_URL), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _columns(engine: object) -> list[str]:
    return sorted(c["name"] for c in inspect(engine).get_columns("webhook_attempts"))  # type: ignore[arg-type]


def test_response_bodies_are_dropped_and_attempts_kept(fresh_url: str) -> None:
    migrate(fresh_url, "0002")
    engine = make_engine(fresh_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO webhooks (id, owner, url, secret, events, all_owners, active, created_at) "
                "VALUES ('w1', 'alice', 'https://hooks.example/x', 's', '[]', false, true, '2026-01-01')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO webhook_deliveries (id, webhook_id, event, body, state, attempts, "
                "next_attempt_at, created_at) VALUES ('d1', 'w1', 'job.failed', '{}', 'failed', 1, "
                "'2026-01-01', '2026-01-01')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO webhook_attempts (delivery_id, attempt, at, duration_ms, status_code, ok, error, "
                "response_excerpt) VALUES ('d1', 1, '2026-01-01', 12, 500, false, 'HTTP 500', 'internal secret')"
            )
        )
    before = _columns(engine)
    migrate(fresh_url, "0003")
    assert migration_status(engine)[0] == "0003"
    assert _columns(engine) == [c for c in before if c != "response_excerpt"]
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM webhook_attempts")).mappings().one()
    assert (row["status_code"], row["duration_ms"], row["error"]) == (500, 12, "HTTP 500")
    assert "internal secret" not in str(dict(row))
    command.downgrade(_alembic_config(fresh_url), "0002")
    assert _columns(engine) == before
    migrate(fresh_url)
    assert "response_excerpt" not in _columns(engine)
    engine.dispose()
