"""The queue core's one outward call: when a job reaches succeeded or failed, every function subscribed
with `on_finish` runs inside the same transaction as the state change (so what it writes, e.g. a webhook
outbox row, commits or rolls back with it). The core knows no subscriber; the fleet features subscribe
(orchestrator/__init__.py wires orchestrator.fleet.outcomes.job_finished: quality gate and webhooks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

FinishHook = Callable[["Session", str], object]

_subscribers: list[FinishHook] = []


def on_finish(hook: FinishHook) -> FinishHook:
    """Subscribe `hook(session, job_id)` to jobs that just finished (succeeded or failed); usable as a
    decorator. Subscribing the same function twice has no effect."""
    if hook not in _subscribers:
        _subscribers.append(hook)
    return hook


def fire_finished(session: Session, job_id: str) -> None:
    """Called by the core (orchestrator.queue.leases) right after a job became succeeded or failed."""
    for hook in list(_subscribers):
        hook(session, job_id)
