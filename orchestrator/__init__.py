"""The orchestrator, in three packages (imports flow dispatcher → executors → queue; fleet → queue):

- `orchestrator.queue`: the job queue — tables (models), the state machine (states), submissions and
  claims, leases and attempts (leases, attempt), the attempt's reports and their recorder, fencing by
  attempt number. It calls nothing outside itself except its on-finish hook (queue/hooks.py).
- `orchestrator.executors`: where attempts run — the one narrow interface (base), threads and Ray
  (the only module importing Ray, lazily). No database.
- `orchestrator.fleet`: schedules, batches, quality gates, webhooks and the registry, subscribed to the
  queue's on-finish hook (below).

Beside them: `dispatcher.py` (claims jobs from the queue and runs them on an executor), `settings.py`,
`db.py`, `auth.py`, `metrics.py`, `logging_setup.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.queue.hooks import on_finish

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


@on_finish
def _fleet_outcomes(session: Session, job_id: str) -> None:
    """Quality gate and webhook outbox of a finished job (imported on first use: workers never need it)."""
    from orchestrator.fleet.outcomes import job_finished

    job_finished(session, job_id)
