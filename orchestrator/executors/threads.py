"""Where attempts run. The dispatcher only needs to start an attempt, have its reports delivered to its
recorder (`attach`), learn when it ended (and whether the worker itself died), stop it, leave it running
when the dispatcher stops (`detach`) and take over one another dispatcher left (`adopt`): `Executor`.
Two implementations: `ThreadExecutor` here (tests, no-Ray embedded use) and `RayExecutor` in
orchestrator/ray_executor.py (the only module importing ray). Workers never open the database: their
reports reach the dispatcher's recorder through the executor (orchestrator.reports).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from orchestrator.attempt import AttemptTicket, run_attempt
from orchestrator.reports import DirectChannel, ReportSink
from orchestrator.settings import Settings


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


class ThreadExecutor:
    """Attempts on a thread pool in this process: no isolation, so a crash of the process takes its
    attempts with it (their leases then expire and another dispatcher rescues them)."""

    def __init__(self, max_workers: int = 1) -> None:
        self._capacity = max_workers
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="qf-attempt")
        self._running: dict[str, tuple[AttemptTicket, Future[str]]] = {}
        self._sink: ReportSink | None = None

    @property
    def capacity(self) -> int:
        return self._capacity

    def attach(self, sink: ReportSink) -> None:
        self._sink = sink

    def submit(self, ticket: AttemptTicket) -> None:
        if self._sink is None:
            raise RuntimeError("attach() a report sink before submitting attempts")
        channel = DirectChannel(self._sink, ticket.job_id, ticket.attempt)
        self._running[ticket.job_id] = (ticket, self._pool.submit(run_attempt, ticket, channel))

    def poll(self) -> list[Finished]:
        done = []
        for job_id, (ticket, future) in list(self._running.items()):
            if future.done():
                del self._running[job_id]
                error = future.exception()
                reason = None if error is None else f"{type(error).__name__}: {error}"
                done.append(Finished(ticket.job_id, ticket.attempt, reason))
        return done

    def cancel(self, job_id: str) -> None:
        """Threads cannot be killed: a running attempt stops itself when it sees the cancel request."""
        entry = self._running.get(job_id)
        if entry is not None:
            entry[1].cancel()

    def detach(self) -> bool:
        """Stop tracking the running attempts without stopping them: they go on in their threads (Python
        waits for them before the process exits), so their leases can be handed to another dispatcher."""
        self._running.clear()
        return True

    def adopt(self, job_id: str, attempt: int) -> bool:
        """Another dispatcher's threads report through that dispatcher's recorder by themselves."""
        return False

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def build_executor(settings: Settings) -> Executor:
    """The executor the settings ask for; Ray is imported only when chosen."""
    if settings.executor == "thread":
        return ThreadExecutor(settings.concurrency or 1)
    from orchestrator.ray_executor import RayExecutor

    return RayExecutor(
        address=settings.ray_address,
        cpus_per_task=settings.cpus_per_task,
        capacity=settings.concurrency,
        object_store_bytes=settings.ray_object_store_bytes,
        task_resources=settings.ray_task_resources or None,
        gpus_per_node=settings.ray_gpus_per_node,
    )
