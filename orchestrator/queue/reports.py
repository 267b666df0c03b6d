"""What a running attempt tells the dispatcher, and how it gets there. Workers hold no database
credentials: an attempt sends reports (plain, picklable dataclasses) over a `Channel`, and the dispatcher
side (orchestrator.queue.recorder) writes them to the database, fenced by the attempt number, answering with
the job's state as that attempt sees it (`Verdict`: running, cancelling, a terminal state, or None once
the attempt was fenced off).

Two channels:
- `DirectChannel`: the attempt runs in the dispatcher's process (thread executor); each report is a call
  of the dispatcher's recorder and the answer comes back at once.
- `Mailbox`: the attempt runs elsewhere (a Ray actor); reports are buffered where the attempt runs and
  the dispatcher holding the attempt's lease drains them, handing back the latest verdict on each drain.

This module imports neither the database nor Ray.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.queue.states import JobState

Verdict = JobState | None  # the job's state while this attempt holds it; None: fenced off


@dataclass(frozen=True)
class Started:
    """The attempt began; `where` (host, pid, Ray node, GPU ids) goes into its start event."""

    where: dict[str, Any]


@dataclass(frozen=True)
class Progressed:
    """The engine's latest progress; `event`: a new stage or layer, worth a job event."""

    data: dict[str, Any]
    event: bool


@dataclass(frozen=True)
class Heartbeat:
    """The attempt's worker is alive (sent from a thread of its own, every third of a lease)."""


@dataclass(frozen=True)
class Poll:
    """No news: only asks for the verdict (is a cancel requested? was the attempt fenced off?)."""


@dataclass(frozen=True)
class Succeeded:
    result: dict[str, Any]
    output_uri: str
    artifacts: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Failed:
    error: str
    retryable: bool


@dataclass(frozen=True)
class Cancelled:
    """The worker stopped at a layer boundary after a cancel request."""


Report = Started | Progressed | Heartbeat | Poll | Succeeded | Failed | Cancelled
FINAL = (Succeeded, Failed, Cancelled)

# The dispatcher side: (job id, attempt, report) -> verdict. Writes to the database, fenced by attempt.
ReportSink = Callable[[str, int, Report], Verdict]


class Channel(Protocol):
    def send(self, report: Report) -> Verdict:
        """Deliver `report`; returns the latest verdict known here (Mailbox: as of the last drain)."""
        ...

    def verdict(self) -> Verdict:
        """The latest verdict, refreshed if it is older than `poll_seconds` where that costs a call."""
        ...


class DirectChannel:
    """Reports are calls of the dispatcher's recorder in this process (the thread executor)."""

    def __init__(self, sink: ReportSink, job_id: str, attempt: int, poll_seconds: float = 1.0) -> None:
        self.sink, self.job_id, self.attempt, self.poll_seconds = sink, job_id, attempt, poll_seconds
        self._verdict: Verdict = JobState.RUNNING
        self._at = time.monotonic()

    def send(self, report: Report) -> Verdict:
        self._verdict = self.sink(self.job_id, self.attempt, report)
        self._at = time.monotonic()
        return self._verdict

    def verdict(self) -> Verdict:
        if self._verdict in (JobState.RUNNING, JobState.CANCELLING) and (
            time.monotonic() - self._at > self.poll_seconds
        ):
            return self.send(Poll())
        return self._verdict


class Mailbox:
    """Reports buffered where the attempt runs, for the dispatcher to drain; thread-safe. The verdict the
    attempt acts on is the one the dispatcher handed back with its latest drain."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reports: list[Report] = []
        self._verdict: Verdict = JobState.RUNNING
        self._closed = False
        self._error: str | None = None
        self._drained_at = time.monotonic()

    def send(self, report: Report) -> Verdict:
        with self._lock:
            self._reports.append(report)
            return self._verdict

    def verdict(self) -> Verdict:
        with self._lock:
            return self._verdict

    def close(self, error: str | None = None) -> None:
        """The attempt ended (`error`: it crashed outside the engine, e.g. an import failed)."""
        with self._lock:
            self._closed, self._error = True, error

    def drain(self, verdict: Verdict | str = "unknown") -> tuple[list[Report], bool, str | None]:
        """Take the buffered reports, first storing `verdict` (the dispatcher's answer to the previous
        drain; "unknown" leaves it). Returns (reports, whether the attempt ended, its crash if any): once
        `ended` is True the reports returned are the last ones."""
        with self._lock:
            self._drained_at = time.monotonic()
            if verdict != "unknown":
                self._verdict = None if verdict is None else JobState(verdict)
            reports, self._reports = self._reports, []
            return reports, self._closed, self._error

    def unheard_for(self) -> float:
        """Seconds since a dispatcher last drained this mailbox."""
        with self._lock:
            return time.monotonic() - self._drained_at

    def orphaned(self) -> None:
        """No dispatcher drains this mailbox any more (its lease was rescued, the job may run elsewhere):
        the attempt acts as fenced off and stops at its next progress report."""
        with self._lock:
            self._verdict = None
