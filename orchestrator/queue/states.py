"""The job state machine. The jobs row holds the current state; every transition is one job event.

queued ──claim──▶ running ──▶ succeeded | failed
  │                 │  └─ attempt failed, retries left / lease expired ──▶ queued
  └─cancel─▶ cancelled ◀── cancelling ◀─cancel─┘
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE = frozenset({JobState.RUNNING, JobState.CANCELLING})  # an attempt holds a lease

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.QUEUED, JobState.CANCELLING}),
    JobState.CANCELLING: frozenset({JobState.CANCELLED, JobState.SUCCEEDED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def can_transition(old: JobState, new: JobState) -> bool:
    return new in TRANSITIONS[old]


def sources_of(new: JobState) -> list[str]:
    """States a job may move to `new` from: the WHERE clause of a conditional UPDATE."""
    return [old.value for old, targets in TRANSITIONS.items() if new in targets]
