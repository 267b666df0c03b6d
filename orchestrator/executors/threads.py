"""Attempts on a thread pool of the dispatcher's process: tests and no-Ray embedded use."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from orchestrator.executors.base import Finished
from orchestrator.queue.attempt import AttemptTicket, run_attempt
from orchestrator.queue.reports import DirectChannel, ReportSink


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
