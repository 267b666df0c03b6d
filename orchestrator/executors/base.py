"""The one narrow interface between the dispatcher and wherever attempts run: `Executor`.

The dispatcher only needs to start an attempt, have its reports delivered to its recorder (`attach`),
learn when it ended (and whether the worker itself died), stop it, leave it running when the dispatcher
stops (`detach`) and take over one another dispatcher left (`adopt`). Workers never open the database:
their reports reach the dispatcher's recorder through the executor (orchestrator.queue.reports).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from orchestrator.queue.attempt import AttemptTicket
from orchestrator.queue.reports import ReportSink


@dataclass(frozen=True)
class Finished:
    """An attempt whose worker returned (`error` None; its outcome was reported and recorded) or died."""

    job_id: str
    attempt: int
    error: str | None


class Unschedulable(Exception):
    """The attempt can never start on this executor (e.g. it asks for more GPUs than any node has): the
    dispatcher fails the job at once, without retries, with this message as its error."""


class Executor(Protocol):
    @property
    def capacity(self) -> int:
        """How many attempts this executor should run at once."""
        ...

    def attach(self, sink: ReportSink) -> None:
        """Where the attempts' reports go: the dispatcher's recorder (called in the dispatcher's process)."""
        ...

    def submit(self, ticket: AttemptTicket) -> None: ...

    def poll(self) -> list[Finished]:
        """Attempts that ended since the last poll (reports that arrived meanwhile are delivered first)."""
        ...

    def cancel(self, job_id: str) -> None: ...

    def detach(self) -> bool:
        """Stop tracking the running attempts without stopping them; True if they really go on running
        after this dispatcher stops (their leases are then handed off), False if they cannot."""
        ...

    def adopt(self, job_id: str, attempt: int) -> bool:
        """Track a running attempt that another dispatcher started and handed off; True if this executor
        now delivers its reports, False if the attempt reports by itself or cannot be reached."""
        ...

    def shutdown(self) -> None: ...
