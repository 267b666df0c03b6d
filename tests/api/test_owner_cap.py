"""The per-owner cap on queued and running jobs holds under racing submits: it is counted and used in one
serialised step per owner (an advisory lock on PostgreSQL; SQLite has one writer at a time)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from api.main import create_app
from orchestrator.db import transaction
from orchestrator.queue import crud
from orchestrator.settings import Settings
from tests.api.test_jobs_api import job_rows
from tests.orchestrator.support import sessions_for

CAP = 3
RACERS = 10


@pytest.fixture
def slow_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Widen the window between counting an owner's jobs and inserting one, as a loaded server would."""
    count = crud.count_active_jobs

    def counted_slowly(*args: Any, **kwargs: Any) -> int:
        n = count(*args, **kwargs)
        time.sleep(0.15)
        return n

    monkeypatch.setattr(crud, "count_active_jobs", counted_slowly)


def _race(client: TestClient, send: Any) -> list[int]:
    start = threading.Barrier(RACERS)
    codes: list[int] = []

    def racer() -> None:
        start.wait()
        codes.append(send(client).status_code)

    threads = [threading.Thread(target=racer) for _ in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return codes


def test_racing_submits_never_pass_the_per_owner_cap(
    settings: Settings, keys: dict, job_body: dict, slow_count: None
) -> None:
    capped = settings.model_copy(update={"max_active_jobs_per_owner": CAP})
    with TestClient(create_app(capped)) as c:
        codes = _race(c, lambda c: c.post("/v1/jobs", json=job_body, headers=keys["alice"]))
        assert c.post("/v1/jobs", json=job_body, headers=keys["bob"]).status_code == 202  # per owner
    assert sorted(codes) == [202] * CAP + [429] * (RACERS - CAP)
    assert job_rows(settings) == CAP + 1


def test_racing_batches_never_pass_the_per_owner_cap(
    settings: Settings, keys: dict, job_body: dict, slow_count: None
) -> None:
    template = {k: v for k, v in job_body.items() if k not in ("model", "method", "bits", "group_size")}
    batch = {
        "template": template,
        "matrix": {"model": [job_body["model"]], "method": ["rtn"], "bits": [4], "group_size": [32]},
    }
    capped = settings.model_copy(update={"max_active_jobs_per_owner": CAP})
    with TestClient(create_app(capped)) as c:
        codes = _race(c, lambda c: c.post("/v1/batches", json=batch, headers=keys["alice"]))
    assert sorted(codes) == [202] * CAP + [429] * (RACERS - CAP)
    assert job_rows(settings) == CAP


def _wait_for_a_lock_waiter(settings: Settings) -> None:
    """Until a transaction waits for an owner's advisory lock (PostgreSQL); SQLite shows no waiters: a
    second, long enough for the submit to reach its BEGIN IMMEDIATE."""
    if not settings.database_url.startswith("postgresql"):
        time.sleep(1.0)
        return
    waiting = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    deadline = time.monotonic() + 30
    with sessions_for(settings.database_url)() as s:
        while not s.scalar(waiting):
            assert time.monotonic() < deadline, "the submit never waited for the owner's lock"
            time.sleep(0.02)
            s.rollback()  # a fresh snapshot of pg_locks


def test_a_submit_counts_the_job_committed_while_it_waited_for_the_owner(
    settings: Settings, keys: dict, job_body: dict
) -> None:
    """The owner's jobs are counted after the submit's turn came (the lock granted), not before: with a
    cap of 1, a job committed by the transaction that held the owner's lock meanwhile makes it a 429."""
    capped = settings.model_copy(update={"max_active_jobs_per_owner": 1})
    codes: list[int] = []
    with TestClient(create_app(capped)) as c:
        assert c.get("/v1/jobs", headers=keys["alice"]).status_code == 200  # key checked (and kept) first
        submit = threading.Thread(
            target=lambda: codes.append(c.post("/v1/jobs", json=job_body, headers=keys["alice"]).status_code)
        )
        with transaction(sessions_for(settings.database_url)) as holder:
            crud.lock_owner(holder, "alice")
            crud.create_job(holder, owner="alice", spec={"model": "m"}, request_hash="h", max_attempts=1)
            submit.start()
            _wait_for_a_lock_waiter(capped)
            assert codes == []  # still waiting for its turn
        submit.join(timeout=60)
    assert codes == [429]
    assert job_rows(settings) == 1
