"""Server-Sent Events for GET /v1/jobs/{id}/events?follow=true: the job's events as they are written,
then one `end` event once the job is in a terminal state and every event before it was sent.

Each event carries its database id as the SSE `id`, so a client that reconnects (browsers do it by
themselves, sending Last-Event-ID; `quantfleet` passes ?after=) resumes exactly where it stopped. The
stream polls the database (events are written by workers in other processes, so there is nothing to
subscribe to in this one) and sends a comment line every few seconds so proxies keep the connection.
A stream ends after `max_seconds` even if the job has not; the client simply reconnects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.schemas import EventOut
from orchestrator import crud
from orchestrator.db import transaction
from orchestrator.models import Job, JobEvent
from orchestrator.states import TERMINAL

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
MAX_STREAM_SECONDS = 3600.0
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def sse(event: str, data: str, event_id: int | None = None) -> str:
    lines = [f"id: {event_id}"] if event_id is not None else []
    lines.append(f"event: {event}")
    lines += [f"data: {line}" for line in data.splitlines() or [""]]
    return "\n".join(lines) + "\n\n"


def job_event_stream(
    sessions: sessionmaker[Session],
    job_id: str,
    after: int,
    to_out: Callable[[JobEvent], EventOut],
    *,
    poll_seconds: float = POLL_SECONDS,
    max_seconds: float = MAX_STREAM_SECONDS,
) -> Iterator[str]:
    started = last_sent = time.monotonic()
    while True:
        with transaction(sessions) as session:
            # The state is read before the events: if it is terminal here, the final event is already
            # written, so the events read next include it.
            state = session.scalar(select(Job.state).where(Job.id == job_id))
            events = crud.list_events(session, job_id, after=after, limit=500)
        for event in events:
            after = event.id
            out = to_out(event)
            yield sse(out.kind, out.model_dump_json(), out.id)
            last_sent = time.monotonic()
        if len(events) == 500:
            continue  # more are waiting
        if state is None or state in {s.value for s in TERMINAL}:
            yield sse("end", json.dumps({"job_id": job_id, "state": state}), after or None)
            return
        now = time.monotonic()
        if now - started > max_seconds:
            return
        if now - last_sent >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = now
        time.sleep(poll_seconds)
