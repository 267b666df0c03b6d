"""The job state machine. The jobs row holds the current state; every transition is one job event.

Enforced: every state change of the queue (claims, leases, cancels) is a conditional UPDATE whose WHERE
clause comes from `sources()` below, so a row in a state that may not move to the target is never
changed, and asking for a transition this table does not allow raises `IllegalTransition`.

queued ──claim──▶ running ──▶ succeeded | failed
  │                 │  └─ attempt failed, retries left / lease expired ──▶ queued
  └─cancel─▶ cancelled ◀── cancelling ◀─cancel─┘
"""

from __future__ import annotations

from collections.abc import Iterable
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
# What counts against an owner's cap of queued and running jobs (sorted: a stable statement parameter)
CAPPED_STATES = [JobState.QUEUED.value, *sorted(s.value for s in ACTIVE)]

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.QUEUED, JobState.CANCELLING}),
    JobState.CANCELLING: frozenset({JobState.CANCELLED, JobState.SUCCEEDED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    """A transition the state machine does not allow was asked for."""


def can_transition(old: JobState, new: JobState) -> bool:
    return new in TRANSITIONS[old]


def check_transition(old: JobState, new: JobState) -> None:
    """Raise IllegalTransition unless a job in state `old` may move to `new`."""
    if not can_transition(old, new):
        raise IllegalTransition(f"a {old.value} job cannot become {new.value}")


def sources_of(new: JobState) -> list[str]:
    """States a job may move to `new` from: the WHERE clause of a conditional UPDATE."""
    return [old.value for old, targets in TRANSITIONS.items() if new in targets]


def sources(new: JobState, among: Iterable[JobState]) -> list[str]:
    """The states of `among` (e.g. those an attempt may hold the job in) from which a job may move to
    `new`, for the WHERE clause of the UPDATE making that move; IllegalTransition if there are none."""
    allowed = sorted(old.value for old in among if can_transition(old, new))
    if not allowed:
        names = ", ".join(sorted(old.value for old in among))
        raise IllegalTransition(f"a job in {names} cannot become {new.value}")
    return allowed
