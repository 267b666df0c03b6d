"""The per-owner cap on queued and running jobs holds under racing submits: it is counted and used in one
serialised step per owner (an advisory lock on PostgreSQL; SQLite has one writer at a time)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from orchestrator.queue import crud
from orchestrator.settings import Settings
from tests.api.test_jobs_api import job_rows

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
