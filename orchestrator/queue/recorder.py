"""The dispatcher's side of an attempt's reports (orchestrator.queue.reports): each report becomes one
transaction on the job row, fenced by the attempt number (orchestrator.queue.leases), so a worker whose
attempt was rescued can change nothing. Only the dispatcher's process holds the database URL."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db import transaction
from orchestrator.queue.leases import (
    RetryPolicy,
    cancel_attempt,
    current_state,
    fail_attempt,
    record_progress,
    start_attempt,
    succeed_attempt,
    worker_heartbeat,
)
from orchestrator.queue.reports import (
    Cancelled,
    Failed,
    Heartbeat,
    Poll,
    Progressed,
    Report,
    Started,
    Succeeded,
    Verdict,
)
from orchestrator.queue.states import JobState


class AttemptRecorder:
    """A `ReportSink`: writes one report of attempt `attempt` of job `job_id`, returns the verdict."""

    def __init__(self, sessions: sessionmaker[Session], policy: RetryPolicy) -> None:
        self.sessions, self.policy = sessions, policy

    def __call__(self, job_id: str, attempt: int, report: Report) -> Verdict:
        with transaction(self.sessions) as s:
            return self._record(s, job_id, attempt, report)

    def _record(self, s: Session, job_id: str, attempt: int, report: Report) -> Verdict:
        if isinstance(report, Started):
            return start_attempt(s, job_id, attempt, report.where)
        if isinstance(report, Progressed):
            return record_progress(s, job_id, attempt, report.data, event=report.event)
        if isinstance(report, Heartbeat):
            return current_state(s, job_id, attempt) if worker_heartbeat(s, job_id, attempt) else None
        if isinstance(report, Poll):
            return current_state(s, job_id, attempt)
        if isinstance(report, Succeeded):
            done = succeed_attempt(
                s,
                job_id,
                attempt,
                result=report.result,
                output_uri=report.output_uri,
                artifacts=report.artifacts,
            )
            return JobState.SUCCEEDED if done else None
        if isinstance(report, Cancelled):
            return JobState.CANCELLED if cancel_attempt(s, job_id, attempt) else None
        if isinstance(report, Failed):
            return fail_attempt(
                s, job_id, attempt, error=report.error, retryable=report.retryable, policy=self.policy
            )
        raise TypeError(f"not a report: {report!r}")
