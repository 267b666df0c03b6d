"""Migration 0002 on a database that already holds jobs: the jobs survive the upgrade (with no batch and
no gate verdict), and a downgrade to 0001 followed by an upgrade gives the same schema back."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect, text

from orchestrator.db import make_engine, migrate, migration_status


def test_upgrade_keeps_existing_jobs_and_downgrade_round_trips(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate(url, "0001")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, owner, request_hash, spec, state, priority, attempts, max_attempts, "
                "created_at, updated_at) VALUES ('j1', 'alice', 'h', '{\"method\": \"rtn\"}', 'succeeded', 0, 1, 3, "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
        )
    migrate(url, "0002")
    assert migration_status(engine)[0] == "0002"
    with engine.connect() as conn:
        row = conn.execute(text("SELECT id, state, batch_id, gate_passed, gate_result FROM jobs")).one()
    assert tuple(row) == ("j1", "succeeded", None, None, None)
    upgraded = {
        t: sorted(c["name"] for c in inspect(engine).get_columns(t))
        for t in inspect(engine).get_table_names()
    }

    from alembic import command

    from orchestrator.db import _alembic_config

    command.downgrade(_alembic_config(url), "0001")
    engine.dispose()
    assert migration_status(engine)[0] == "0001"
    assert "schedules" not in inspect(engine).get_table_names()
    assert "batch_id" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    migrate(url, "0002")
    again = {
        t: sorted(c["name"] for c in inspect(engine).get_columns(t))
        for t in inspect(engine).get_table_names()
    }
    assert again == upgraded
    engine.dispose()
