"""orchestrator/ in three packages: the job queue calls nothing outside itself but its on-finish hook (the
fleet subscribes), the executors never touch the database, and imports flow one way."""

from __future__ import annotations

import ast
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db import transaction
from orchestrator.queue import crud
from orchestrator.queue.hooks import _subscribers, on_finish
from orchestrator.queue.leases import claim_jobs, succeed_attempt
from orchestrator.queue.models import Job
from tests.orchestrator.support import sessions_for

ORCHESTRATOR = Path(__file__).resolve().parents[2] / "orchestrator"


def _running_job(sessions: sessionmaker[Session]) -> str:
    with transaction(sessions) as s:
        job_id = crud.create_job(s, owner="a", spec={"model": "m"}, request_hash="h", max_attempts=3).id
    with transaction(sessions) as s:
        assert [c.job_id for c in claim_jobs(s, owner="d", limit=1, lease_seconds=30)] == [job_id]
    return job_id


def test_the_core_fires_its_on_finish_hook_in_the_finishing_transaction(database_url: str) -> None:
    sessions = sessions_for(database_url)
    job_id = _running_job(sessions)
    seen: list[tuple[str, str]] = []

    def hook(session: Session, finished: str) -> None:
        job = session.get(Job, finished)
        assert job is not None
        seen.append((finished, job.state))

    on_finish(hook)
    try:
        with transaction(sessions) as s:
            assert succeed_attempt(s, job_id, 1, result={}, output_uri="u", artifacts=[])
    finally:
        _subscribers.remove(hook)
    assert seen == [(job_id, "succeeded")]


def _imports(package: str, pattern: str = "*.py") -> set[str]:
    found = set()
    for path in (ORCHESTRATOR / package).glob(pattern):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return found


def test_the_packages_import_in_one_direction() -> None:
    queue, executors = _imports("queue"), _imports("executors")
    assert not {m for m in queue if m.startswith(("orchestrator.fleet", "orchestrator.executors", "ray"))}
    assert not {m for m in executors if m.startswith(("orchestrator.fleet", "orchestrator.db", "sqlalchemy"))}
    assert not {m for m in _imports("fleet") if m.startswith("orchestrator.executors")}
    # the worker's side of an attempt holds no database: nothing of SQLAlchemy, the db or the leases
    for worker_side in ("attempt.py", "reports.py"):
        imported = _imports("queue", worker_side)
        assert not {
            m
            for m in imported
            if m.startswith(("sqlalchemy", "orchestrator.db", "orchestrator.queue.leases"))
        }
    # no cycle between the interface, the thread executor and Ray's
    for module in ("base.py", "threads.py"):
        assert "orchestrator.executors.ray_executor" not in _imports("executors", module)
    assert "orchestrator.executors" not in _imports("executors", "ray_executor.py")  # only .base
