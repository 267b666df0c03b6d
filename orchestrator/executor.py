"""Where attempts run. The dispatcher only needs to start an attempt, learn when it ended (and whether
the worker itself died), and stop it: `Executor`. Two implementations: `ThreadExecutor` here (tests,
no-Ray embedded use) and `RayExecutor` in orchestrator/ray_executor.py (the only module importing ray).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from orchestrator.attempt import AttemptTicket, run_attempt
from orchestrator.settings import Settings


@dataclass(frozen=True)
class Finished:
    """An attempt whose worker returned (`error` None; the attempt recorded its own outcome) or died."""

    ticket: AttemptTicket
    error: str | None


class Unschedulable(Exception):
    """The attempt can never start on this executor (e.g. it asks for more GPUs than any node has): the
    dispatcher fails the job at once, without retries, with this message as its error."""


class Executor(Protocol):
    @property
    def capacity(self) -> int:
        """How many attempts this executor should run at once."""
        ...

    def submit(self, ticket: AttemptTicket) -> None: ...
    def poll(self) -> list[Finished]: ...
    def cancel(self, job_id: str) -> None: ...
    def shutdown(self) -> None: ...


class ThreadExecutor:
    """Attempts on a thread pool in this process: no isolation, so a crash of the process takes its
    attempts with it (their leases then expire and another dispatcher rescues them)."""

    def __init__(self, max_workers: int = 1) -> None:
        self._capacity = max_workers
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="qf-attempt")
        self._running: dict[str, tuple[AttemptTicket, Future[str]]] = {}

    @property
    def capacity(self) -> int:
        return self._capacity

    def submit(self, ticket: AttemptTicket) -> None:
        self._running[ticket.job_id] = (ticket, self._pool.submit(run_attempt, ticket))

    def poll(self) -> list[Finished]:
        done = []
        for job_id, (ticket, future) in list(self._running.items()):
            if future.done():
                del self._running[job_id]
                error = future.exception()
                done.append(Finished(ticket, None if error is None else f"{type(error).__name__}: {error}"))
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
