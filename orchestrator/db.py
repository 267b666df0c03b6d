"""Engines, sessions and migrations for SQLite (embedded default) and PostgreSQL.

SQLite runs in WAL mode with a busy timeout, and every transaction starts with BEGIN IMMEDIATE: the
writer lock is taken up front, so concurrent writers queue behind busy_timeout instead of failing
with "database is locked" when a read transaction later tries to write.

Engines hide statement parameters (`hide_parameters`): a failed statement's error, and so any log line or
traceback that carries it, never shows the values it was sent (webhook secrets, key hashes, user input).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc, make_url
from sqlalchemy.orm import Session, sessionmaker

REPO_ROOT = Path(__file__).resolve().parent.parent
SQLITE_BUSY_TIMEOUT_MS = 30_000


def absolute_url(url: str) -> str:
    """A SQLite URL with an absolute file path, so workers in other directories open the same file."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return url
    path = Path(parsed.database).expanduser().resolve()
    return parsed.set(database=str(path)).render_as_string(hide_password=False)


PING_AFTER_IDLE_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """SQLAlchemy's `pool_pre_ping`, for connections that sat in the pool longer than PING_AFTER_IDLE_S only.

    A ping is a round trip to the server on every checkout: under load, a submit's second one (its insert is
    one round trip, orchestrator/queue/pg_submit.py), about a quarter of the API's time per submit. A
    connection in steady use was just used successfully; one that waited in the pool may have been cut (a
    database restart, an idle timeout), and is pinged: if the ping fails, the pool drops it and connects
    anew, as with pre-ping. A connection cut while in use fails its request either way (a JSON 503)."""

    @event.listens_for(engine, "connect")
    def _connected(_dbapi_conn: Any, record: Any) -> None:
        record.info["returned"] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["returned"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("returned", 0.0) < PING_AFTER_IDLE_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as e:
            raise exc.DisconnectionError(f"a pooled connection failed its ping: {e}") from e
        if not alive:
            raise exc.DisconnectionError("a pooled connection failed its ping")


def make_engine(url: str, *, pool_size: int | None = None, **kwargs: Any) -> Engine:
    """`pool_size` (PostgreSQL): connections kept open, as many again opened for a burst and closed after;
    SQLAlchemy's default (5) otherwise. A server whose request threads outnumber it opens and closes a
    connection for most requests under load."""
    kwargs.setdefault("hide_parameters", True)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        if pool_size is not None:
            kwargs.update(pool_size=pool_size, max_overflow=pool_size)
        engine = create_engine(url, **kwargs)
        _ping_when_idle(engine)
        return engine
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" event below issue BEGIN
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with sessions() as session, session.begin():
        yield session


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (the only way the schema gets created)."""
    from alembic import command

    make_engine(url).dispose()  # creates the SQLite parent directory if needed
    command.upgrade(_alembic_config(url), revision)


def migration_status(engine: Engine) -> tuple[str | None, str | None]:
    """(current revision in the database, head revision in migrations/)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config("")).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head
