"""Open event streams (GET /v1/jobs/{id}/events?follow=true) never block the server: they wait on the event
loop between polls, their database reads run on a small thread pool of their own, /healthz answers at once
with many of them open, each API key may hold a bounded number of them (a JSON 429 beyond), and a stream
whose database read fails ends with an `error` event instead of breaking off after its 200."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from api.main import create_app
from orchestrator.auth import create_api_key
from orchestrator.db import transaction
from orchestrator.queue import crud
from orchestrator.settings import Settings
from tests.orchestrator.support import sessions_for, wait_for

STREAMS = 60  # more than the default thread pool's 40 threads


@dataclass
class Live:
    url: str
    tokens: list[str]
    job_id: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _queued_job(settings: Settings, owner: str) -> str:
    """A job that stays queued (no dispatcher runs): its event stream stays open."""
    with transaction(sessions_for(settings.database_url)) as s:
        job = crud.create_job(
            s, owner=owner, api_key_id=None, spec={"model": "m"}, request_hash="h", max_attempts=1
        )
        return job.id


@pytest.fixture
def live(settings: Settings) -> Iterator[Live]:
    with transaction(sessions_for(settings.database_url)) as s:
        tokens = [create_api_key(s, owner="alice", scopes=["read"]) for _ in range(STREAMS // 20)]
    job_id = _queued_job(settings, "alice")
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the API server to start")
    try:
        yield Live(f"http://127.0.0.1:{port}", tokens, job_id)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


async def _open_streams(live: Live, n: int, opened: list[int], hold: asyncio.Event) -> None:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=live.url, limits=limits, timeout=30) as client:

        async def one(i: int) -> None:
            headers = {"Authorization": f"Bearer {live.tokens[i % len(live.tokens)]}"}
            async with client.stream(
                "GET", f"/v1/jobs/{live.job_id}/events", params={"follow": "true"}, headers=headers
            ) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("event: state"):
                        opened.append(i)
                        break
                await hold.wait()

        await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)


def test_healthz_stays_fast_with_many_open_streams(live: Live) -> None:
    opened: list[int] = []
    loop = asyncio.new_event_loop()
    hold = asyncio.Event()
    streams = threading.Thread(
        target=lambda: loop.run_until_complete(_open_streams(live, STREAMS, opened, hold)), daemon=True
    )
    streams.start()
    try:
        # Without waiting on the event loop, streams past the thread pool's size never even start.
        deadline = time.monotonic() + 10
        while len(opened) < STREAMS and time.monotonic() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=live.url, timeout=5) as client:
            health, read = [], []
            for _ in range(10):
                t0 = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                health.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                headers = {"Authorization": f"Bearer {live.tokens[0]}"}
                assert client.get(f"/v1/jobs/{live.job_id}", headers=headers).status_code == 200
                read.append(time.perf_counter() - t0)
        assert len(opened) == STREAMS
        assert max(health) < 0.5, health  # milliseconds normally; seconds would fail a liveness probe
        assert max(read) < 2.0, read  # other requests still find free threads
    finally:
        loop.call_soon_threadsafe(hold.set)
        streams.join(timeout=15)
        loop.close()


def test_open_streams_per_key_are_capped_with_a_json_429(settings: Settings, keys: dict) -> None:
    settings = settings.model_copy(update={"max_streams_per_key": 2})
    job_id = _queued_job(settings, "alice")
    url = f"/v1/jobs/{job_id}/events?follow=true"
    with TestClient(create_app(settings)) as client:
        with (
            client.stream("GET", url, headers=keys["alice"]) as a,
            client.stream("GET", url, headers=keys["alice"]) as b,
        ):
            assert a.status_code == b.status_code == 200
            third = client.get(url, headers=keys["alice"])
            assert third.status_code == 429 and third.headers["content-type"] == "application/json"
            assert "2 open event streams" in third.json()["detail"]
            assert int(third.headers["Retry-After"]) >= 1
            # another key of the same owner has its own allowance, and plain reads are not streams
            with client.stream("GET", url, headers=keys["reader"]) as other:
                assert other.status_code == 200
            assert client.get(f"/v1/jobs/{job_id}/events", headers=keys["alice"]).status_code == 200
        # closed streams give their places back
        wait_for(
            lambda: (
                client.get(f"/v1/jobs/{job_id}", headers=keys["alice"])
                and _stream_status(client, url, keys["alice"]) == 200
            ),
            10,
            "a closed stream's place to be given back",
        )


def _stream_status(client: TestClient, url: str, headers: dict[str, str]) -> int:
    with client.stream("GET", url, headers=headers) as r:
        return r.status_code


def test_a_stream_whose_database_read_fails_ends_with_an_error_event(
    settings: Settings, keys: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = _queued_job(settings, "alice")
    calls: list[int] = []
    list_events = crud.list_events

    def failing_after_the_first(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > 1:
            raise OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))
        return list_events(*args, **kwargs)

    monkeypatch.setattr(crud, "list_events", failing_after_the_first)
    with (
        TestClient(create_app(settings)) as client,
        client.stream("GET", f"/v1/jobs/{job_id}/events?follow=true", headers=keys["alice"]) as r,
    ):
        assert r.status_code == 200
        lines = iter(r.iter_lines())
        assert next(lines).startswith("id: ")
        with transaction(sessions_for(settings.database_url)) as s:  # something new to read
            crud.add_event(s, job_id, "progress", 0, stage="load", message="loading")
        rest = list(lines)  # the body ends cleanly: no exception, no truncated chunk
    text = "\n".join(rest)
    assert "event: error" in text and "database" in text and "Last-Event-ID" in text
    assert "server closed the connection" not in text  # no internals


def test_a_failed_poll_ends_every_open_stream_with_an_error_event(
    settings: Settings, keys: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.event_stream import EventHub

    job_id = _queued_job(settings, "alice")

    def unreachable(self: EventHub, job_ids: list[str]) -> Any:
        raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(EventHub, "_read_seen", unreachable)
    with (
        TestClient(create_app(settings)) as client,
        client.stream("GET", f"/v1/jobs/{job_id}/events?follow=true", headers=keys["alice"]) as r,
    ):
        text = "".join(r.iter_text())
    assert r.status_code == 200
    assert text.startswith("id: ") and "event: state" in text  # what could be read was sent first
    assert text.rstrip().split("\n\n")[-1].startswith("id: ") and "event: error" in text
