"""Pooled PostgreSQL connections are pinged only after sitting idle (orchestrator/db.py, `_ping_when_idle`):
a connection the server cut while it waited in the pool is replaced on checkout, not handed out; one in steady
use costs no extra round trip."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from orchestrator import db

pytestmark = pytest.mark.postgres


def _backend_pids(engine: db.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text("SELECT pg_backend_pid()")))


def test_a_connection_cut_while_idle_in_the_pool_is_replaced(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = db.make_engine(postgres_url, pool_size=1)
    other = db.make_engine(postgres_url)
    try:
        first = _backend_pids(engine)
        with other.connect() as admin:  # the server ends the pooled connection's backend (a restart, a timeout)
            assert admin.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": first}) is True
        monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)  # it has been idle "long enough"
        second = _backend_pids(engine)  # pinged, found dead, replaced: no error reaches the caller
        assert second != first
    finally:
        engine.dispose()
        other.dispose()


def test_a_connection_in_steady_use_is_not_pinged(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = db.make_engine(postgres_url, pool_size=1)
    pings: list[Any] = []
    ping = engine.dialect.do_ping

    def counted(conn: Any) -> bool:
        pings.append(conn)
        return ping(conn)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    try:
        for _ in range(5):
            _backend_pids(engine)
        assert pings == [], "checked out within PING_AFTER_IDLE_S of its last use: no ping"
        monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)
        _backend_pids(engine)
        assert len(pings) == 1
    finally:
        engine.dispose()
