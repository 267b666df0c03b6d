"""During a database outage every request that needs the database gets a JSON 503 with Retry-After (not a
500): the database refusing connections (a PostgreSQL URL whose port refuses), and the connection dropping in
the middle of a request. /healthz does not need the database and stays 200."""

from __future__ import annotations

import socket
import sqlite3
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api.main import create_app
from orchestrator.queue import crud
from orchestrator.settings import Settings


def _refusing_port() -> int:
    """A loopback port nothing listens on (bound and closed again: connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _assert_unavailable(r: Any) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["Retry-After"]) >= 1
    assert "database" in r.json()["detail"] and "try again" in r.json()["detail"]


@pytest.fixture
def down(settings: Settings) -> Settings:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{_refusing_port()}/test?connect_timeout=2"
    return settings.model_copy(update={"database_url": url})


@pytest.mark.postgres
def test_a_database_that_refuses_connections_gives_json_503(down: Settings, job_body: dict) -> None:
    token = {"Authorization": "Bearer qf_not_checked_while_the_database_is_down"}
    with TestClient(create_app(down), raise_server_exceptions=False) as client:
        _assert_unavailable(client.post("/v1/jobs", json=job_body, headers=token))
        _assert_unavailable(client.get("/v1/jobs", headers=token))
        _assert_unavailable(client.get("/v1/jobs/j1/events?follow=true", headers=token))
        _assert_unavailable(client.get("/v1/webhooks", headers=token))
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
    no_auth = down.model_copy(update={"no_auth": True})
    with TestClient(create_app(no_auth), raise_server_exceptions=False) as client:
        _assert_unavailable(client.post("/v1/jobs", json=job_body))


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly")),
        PoolTimeout("QueuePool limit of size 5 overflow 10 reached"),
        OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked")),
    ],
    ids=["connection-lost", "pool-exhausted", "sqlite-locked"],
)
def test_a_connection_lost_mid_request_gives_json_503(
    client: TestClient, keys: dict, job_body: dict, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def lost(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(crud, "submit_job", lost)
    client_ = TestClient(client.app, raise_server_exceptions=False)
    r = client_.post("/v1/jobs", json=job_body, headers=keys["alice"])
    _assert_unavailable(r)
    assert "server closed" not in r.text and "QueuePool" not in r.text  # no internals


def test_other_database_errors_stay_a_500(
    client: TestClient, keys: dict, job_body: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("no such table: jobs"))

    monkeypatch.setattr(crud, "submit_job", broken)
    r = TestClient(client.app, raise_server_exceptions=False).post(
        "/v1/jobs", json=job_body, headers=keys["alice"]
    )
    assert r.status_code == 500 and "Retry-After" not in r.headers
