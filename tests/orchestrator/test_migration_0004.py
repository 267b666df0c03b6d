"""Migration 0004 adds the jobs' nullable plan column (the preflight plan, JSON), on SQLite and PostgreSQL:
existing jobs keep their rows with no plan, a plan round-trips, and a downgrade drops the column."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text

from orchestrator.db import _alembic_config, make_engine, migrate, migration_status
from tests.orchestrator.test_migration_0003 import fresh_url  # noqa: F401 - the fixture


def _columns(engine: object) -> list[str]:
    return sorted(c["name"] for c in inspect(engine).get_columns("jobs"))  # type: ignore[arg-type]


def test_plan_column_up_and_down(fresh_url: str) -> None:  # noqa: F811
    migrate(fresh_url, "0003")
    engine = make_engine(fresh_url)
    insert = (
        "INSERT INTO jobs (id, owner, request_hash, spec, state, priority, attempts, max_attempts, created_at, "
        "updated_at{extra}) VALUES (:id, 'alice', 'h', '{{}}', 'queued', 0, 0, 3, '2026-01-01', '2026-01-01'{value})"
    )
    with engine.begin() as conn:
        conn.execute(text(insert.format(extra="", value="")), {"id": "old"})
    before = _columns(engine)
    assert "plan" not in before
    migrate(fresh_url)
    assert migration_status(engine) == ("0004", "0004")
    assert _columns(engine) == sorted([*before, "plan"])
    with engine.begin() as conn:
        conn.execute(text(insert.format(extra=", plan", value=", :plan")), {"id": "new", "plan": '{"num_layers": 2}'})
        rows = dict(conn.execute(text("SELECT id, plan FROM jobs")).all())
    assert rows["old"] is None and "num_layers" in str(rows["new"])
    command.downgrade(_alembic_config(fresh_url), "0003")
    assert _columns(engine) == before
    with engine.connect() as conn:
        assert sorted(conn.execute(text("SELECT id FROM jobs")).scalars()) == ["new", "old"]
    migrate(fresh_url)
    assert "plan" in _columns(engine)
    engine.dispose()
