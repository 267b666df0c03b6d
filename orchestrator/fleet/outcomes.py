"""What happens when a job reaches succeeded or failed, inside the same transaction as the state change:
its quality gate is checked (succeeded jobs with a gate) and one outbox row per subscribed webhook and
event is written (`webhook_deliveries`, state pending).

Writing the outbox in the finishing transaction is what makes webhooks reliable: if the transaction
commits, the deliveries exist and the delivery loop (orchestrator/fleet/delivery_loop.py) will send them,
with retries, even after a crash; if it rolls back (e.g. the attempt was fenced off), nothing is sent.
The unique (webhook, job, event) row means a job can never produce the same event twice.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from orchestrator.fleet.gates import evaluate_gate
from orchestrator.fleet.webhooks import encode_event
from orchestrator.queue.models import Artifact, Job, Webhook, WebhookDelivery, utcnow
from orchestrator.queue.states import JobState

log = logging.getLogger("quantfleet.outcomes")

PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"


def job_finished(session: Session, job_id: str) -> list[str]:
    """Gate check and webhook outbox for a job that just became succeeded or failed; returns the events."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.state not in (JobState.SUCCEEDED.value, JobState.FAILED.value):
        return []
    events = [f"job.{job.state}"]
    gate = (job.spec or {}).get("gate")
    if job.state == JobState.SUCCEEDED.value and gate:
        verdict = evaluate_gate(gate, job.result)
        job.gate_passed, job.gate_result = verdict.passed, verdict.to_dict()
        if not verdict.passed:
            events.append("job.gate_failed")
            log.info(
                "job %s failed its quality gate: %s",
                job.id,
                "; ".join(verdict.reasons),
                extra={"job_id": job.id, "attempt": job.attempts},
            )
    session.flush()
    enqueue_webhooks(session, job, events)
    return events


def event_data(session: Session, job: Job) -> dict[str, Any]:
    """The `data` of a job event: what a registry needs to index the artifact without calling back."""
    artifacts = session.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.path))
    spec = job.spec or {}
    return {
        "job": {
            "id": job.id,
            "state": job.state,
            "owner": job.owner,
            "labels": {label.key: label.value for label in job.labels},
            "batch_id": job.batch_id,
            "model": spec.get("model"),
            "base_model": spec.get("base_model"),
            "method": spec.get("method"),
            "bits": spec.get("bits"),
            "group_size": spec.get("group_size"),
            "attempts": job.attempts,
            "error": job.error,
            "output_uri": job.output_uri,
            "metrics": (job.result or {}).get("eval"),
            "gate": job.gate_result,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "artifacts": [
                {"path": a.path, "uri": a.uri, "kind": a.kind, "sha256": a.sha256, "bytes": a.bytes}
                for a in artifacts
            ],
        }
    }


def enqueue_webhooks(session: Session, job: Job, events: list[str]) -> int:
    """One pending delivery per active webhook subscribed to each event (the job owner's, and admins'
    all-owner webhooks). Returns how many were queued."""
    hooks = session.scalars(
        select(Webhook).where(
            Webhook.active.is_(True), or_(Webhook.owner == job.owner, Webhook.all_owners.is_(True))
        )
    ).all()
    wanted = [(hook, event) for hook in hooks for event in events if event in hook.events]
    if not wanted:
        return 0
    data = event_data(session, job)
    now = utcnow()
    for hook, event in wanted:
        delivery_id = uuid.uuid4().hex
        body = encode_event(event, data, delivery_id=delivery_id, at=now).decode()
        session.add(
            WebhookDelivery(
                id=delivery_id,
                webhook_id=hook.id,
                job_id=job.id,
                event=event,
                body=body,
                state=PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    session.flush()
    return len(wanted)
