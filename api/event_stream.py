"""Server-Sent Events for GET /v1/jobs/{id}/events?follow=true: the job's events as they are written,
then one `end` event once the job is in a terminal state and every event before it was sent.

Each event carries its database id as the SSE `id`, so a client that reconnects (browsers do it by
themselves, sending Last-Event-ID; `quantfleet` passes ?after=) resumes exactly where it stopped. Events are
written by workers in other processes, so there is nothing to subscribe to in this one: the database is
polled. A stream ends after `max_seconds` even if the job has not; the client simply reconnects.

Streams never block the server:
- A stream is an async generator: between polls it waits on the event loop, holding no thread.
- One poller per app (`EventHub`) asks the database, in a single query every `poll_seconds`, for the state
  and newest event id of every followed job; a stream reads its events only when that shows something new.
  200 open streams cost one small query per poll, not 200.
- Every database read of the streams runs on a thread pool of their own, `DB_THREADS` threads, so they can
  neither starve the request thread pool nor take more connections than the pool holds.
- Each API key may hold `max_streams_per_key` open streams in one API process (`StreamSlots`); another one
  gets a JSON 429.
- A failed database read ends the stream with an `error` event (the client reconnects with Last-Event-ID):
  nothing is raised after the 200 is sent, so the response is always a complete one.
A comment line is sent every `KEEPALIVE_SECONDS` without events, so proxies keep the connection (and a
client that left is noticed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.schemas import EventOut
from orchestrator.db import transaction
from orchestrator.queue import crud
from orchestrator.queue.models import Job, JobEvent
from orchestrator.queue.states import TERMINAL

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
MAX_STREAM_SECONDS = 3600.0
DB_THREADS = 4  # below the engine's pool size (5), so streams never wait on the pool
BATCH = 500
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
TERMINAL_STATES = frozenset(s.value for s in TERMINAL)
UNAVAILABLE = "the job database did not answer; reconnect with Last-Event-ID to resume"

log = logging.getLogger("quantfleet.api.events")


def sse(event: str, data: str, event_id: int | None = None) -> str:
    lines = [f"id: {event_id}"] if event_id is not None else []
    lines.append(f"event: {event}")
    lines += [f"data: {line}" for line in data.splitlines() or [""]]
    return "\n".join(lines) + "\n\n"


class StreamUnavailable(Exception):
    """The database could not be read for a stream."""


@dataclass(frozen=True)
class Seen:
    """What the last poll saw of one job: its state (None: gone) and its newest event id."""

    state: str | None
    latest: int


class EventHub:
    """Watches the followed jobs of one app with one query per poll, and runs the streams' reads on a
    bounded thread pool. Lives on the app's event loop; its poller runs only while a stream is open."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        poll_seconds: float = POLL_SECONDS,
        threads: int = DB_THREADS,
    ) -> None:
        self.sessions = sessions
        self.poll_seconds = poll_seconds
        self.threads = threads
        self._limiter: anyio.CapacityLimiter | None = None
        self._followers: dict[str, int] = {}
        self._seen: dict[str, Seen] = {}
        self._failed = False
        self._tick: asyncio.Event | None = None
        self._poller: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _bind(self) -> None:
        """Primitives of the running loop (a test client may run the same app on several loops in turn)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._limiter = anyio.CapacityLimiter(self.threads)
            self._tick = asyncio.Event()
            self._poller = None

    async def run_db(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the streams' own threads; any database error becomes StreamUnavailable."""
        self._bind()
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except Exception as e:
            log.warning("event stream database read failed: %s", type(e).__name__, exc_info=e)
            raise StreamUnavailable(UNAVAILABLE) from e

    def follow(self, job_id: str) -> None:
        self._bind()
        self._followers[job_id] = self._followers.get(job_id, 0) + 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_while_followed())

    def unfollow(self, job_id: str) -> None:
        left = self._followers.get(job_id, 0) - 1
        if left > 0:
            self._followers[job_id] = left
        else:
            self._followers.pop(job_id, None)
            self._seen.pop(job_id, None)

    async def changed(self, job_id: str, after: int, timeout: float) -> bool:
        """Wait up to `timeout` s for a poll that shows `job_id` with an event after `after` or in a terminal
        state (or gone). False on timeout; StreamUnavailable when the poll failed."""
        self._bind()
        assert self._tick is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            tick = self._tick
            try:
                await asyncio.wait_for(tick.wait(), left)
            except TimeoutError:
                return False
            if self._failed:
                raise StreamUnavailable(UNAVAILABLE)
            seen = self._seen.get(job_id)
            if seen is not None and (
                seen.latest > after or seen.state is None or seen.state in TERMINAL_STATES
            ):
                return True
        return False

    async def _poll_while_followed(self) -> None:
        while self._followers:
            ids = sorted(self._followers)
            try:
                seen = await self.run_db(self._read_seen, ids)
                self._seen.update(seen)
                self._failed = False
            except StreamUnavailable:
                self._failed = True
            tick, self._tick = self._tick, asyncio.Event()
            assert tick is not None
            tick.set()  # wake every stream waiting on this poll
            await asyncio.sleep(self.poll_seconds)

    def _read_seen(self, job_ids: list[str]) -> dict[str, Seen]:
        with transaction(self.sessions) as session:
            # States before events: a terminal state read here means its final event is already written.
            states = dict(
                session.execute(select(Job.id, Job.state).where(Job.id.in_(job_ids))).tuples().all()
            )
            latest = dict(
                session.execute(
                    select(JobEvent.job_id, func.max(JobEvent.id))
                    .where(JobEvent.job_id.in_(job_ids))
                    .group_by(JobEvent.job_id)
                )
                .tuples()
                .all()
            )
        return {j: Seen(states.get(j), latest.get(j) or 0) for j in job_ids}

    def read_events(self, job_id: str, after: int) -> tuple[str | None, list[JobEvent]]:
        with transaction(self.sessions) as session:
            state = session.scalar(select(Job.state).where(Job.id == job_id))
            return state, crud.list_events(session, job_id, after=after, limit=BATCH)


async def job_event_stream(
    hub: EventHub,
    job_id: str,
    after: int,
    to_out: Callable[[JobEvent], EventOut],
    *,
    max_seconds: float = MAX_STREAM_SECONDS,
    keepalive_seconds: float = KEEPALIVE_SECONDS,
) -> AsyncIterator[str]:
    started = last_sent = time.monotonic()
    hub.follow(job_id)
    try:
        while True:
            state, events = await hub.run_db(hub.read_events, job_id, after)
            for event in events:
                after = event.id
                out = to_out(event)
                yield sse(out.kind, out.model_dump_json(), out.id)
                last_sent = time.monotonic()
            if len(events) == BATCH:
                continue  # more are waiting
            if state is None or state in TERMINAL_STATES:
                yield sse("end", json.dumps({"job_id": job_id, "state": state}), after or None)
                return
            while True:
                now = time.monotonic()
                if now - started > max_seconds:
                    return
                wait = min(keepalive_seconds - (now - last_sent), max_seconds - (now - started))
                if await hub.changed(job_id, after, max(wait, 0.01)):
                    break
                if time.monotonic() - last_sent >= keepalive_seconds:
                    yield ": keep-alive\n\n"
                    last_sent = time.monotonic()
    except StreamUnavailable as e:
        yield sse("error", json.dumps({"job_id": job_id, "detail": str(e)}), after or None)
    except Exception as e:  # never raise once the 200 is sent: end the stream with a reason
        log.error("event stream for job %s failed", job_id, exc_info=e)
        yield sse("error", json.dumps({"job_id": job_id, "detail": "internal error; reconnect to resume"}))
    finally:
        hub.unfollow(job_id)


class StreamSlots:
    """Open event streams per API key in this process, at most `limit` each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        with self._lock:
            if self._open.get(key, 0) >= self.limit:
                return False
            self._open[key] = self._open.get(key, 0) + 1
            return True

    def give_back(self, key: str) -> None:
        with self._lock:
            left = self._open.get(key, 0) - 1
            if left > 0:
                self._open[key] = left
            else:
                self._open.pop(key, None)

    def open(self, key: str) -> int:
        with self._lock:
            return self._open.get(key, 0)


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that gives its stream slot back however it ends (finished, client gone, error)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=HEADERS)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
