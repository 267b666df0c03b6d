"""The delivery loop, a thread in every dispatcher process: sends pending webhook deliveries (the outbox
rows orchestrator/fleet/outcomes.py writes when a job finishes) and registers artifacts that passed their gate
in MLflow when QF_MLFLOW_TRACKING_URI is set.

Several loops may share one database: a row is claimed (claimed_until, with FOR UPDATE SKIP LOCKED on
PostgreSQL) before its network call, and the result is written only by the claim that made it (its
attempt number is the fence). The network call happens outside any transaction, so a slow receiver never
holds database locks. Every attempt becomes a webhook_attempts row; failures are retried with exponential
backoff until the attempts run out.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db import transaction
from orchestrator.fleet.outcomes import FAILED, PENDING, SUCCEEDED
from orchestrator.fleet.registry_mlflow import MlflowError, MlflowRegistry, registered_model_name
from orchestrator.fleet.webhooks import DeliveryAttempt, RetryPolicy, attempt_delivery, next_backoff
from orchestrator.queue.models import Job, Registration, Webhook, WebhookAttempt, WebhookDelivery, utcnow
from orchestrator.queue.states import JobState
from orchestrator.settings import Settings

log = logging.getLogger("quantfleet.deliveries")
CLAIM_LIMIT = 20
MLFLOW = "mlflow"


@dataclass(frozen=True)
class ClaimedDelivery:
    id: str
    attempt: int
    url: str
    secret: str = field(repr=False)  # never in a log line, even by accident
    event: str
    body: bytes


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.webhook_max_attempts,
        initial_backoff_s=settings.webhook_backoff_seconds,
        max_backoff_s=settings.webhook_backoff_max_seconds,
        timeout_s=settings.webhook_timeout_seconds,
    )


def _claimable(model: Any, now: datetime) -> Any:
    return (
        (model.state == PENDING)
        & (model.next_attempt_at <= now)
        & ((model.claimed_until.is_(None)) | (model.claimed_until < now))
    )


def claim_deliveries(
    session: Session, now: datetime, claim_for: timedelta, limit: int = CLAIM_LIMIT
) -> list[ClaimedDelivery]:
    rows = session.execute(
        select(WebhookDelivery, Webhook.url, Webhook.secret)
        .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
        .where(_claimable(WebhookDelivery, now), Webhook.active.is_(True))
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True, of=WebhookDelivery)
    ).all()
    claimed = []
    for delivery, url, secret in rows:
        delivery.attempts += 1
        delivery.claimed_until = now + claim_for
        claimed.append(
            ClaimedDelivery(
                delivery.id, delivery.attempts, url, secret, delivery.event, delivery.body.encode()
            )
        )
    return claimed


def record_attempt(
    session: Session, claim: ClaimedDelivery, outcome: DeliveryAttempt, policy: RetryPolicy
) -> str | None:
    """Store one attempt and move the delivery on; None if this claim was overtaken (nothing written)."""
    now = utcnow()
    if outcome.ok:
        values: dict[str, Any] = {"state": SUCCEEDED, "finished_at": now, "claimed_until": None}
    elif claim.attempt >= policy.max_attempts:
        values = {"state": FAILED, "finished_at": now, "claimed_until": None}
    else:
        delay = next_backoff(policy, claim.attempt, outcome.retry_after_s)
        values = {"next_attempt_at": now + timedelta(seconds=delay), "claimed_until": None}
    moved = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == claim.id,
            WebhookDelivery.attempts == claim.attempt,
            WebhookDelivery.state == PENDING,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        return None
    session.add(
        WebhookAttempt(
            delivery_id=claim.id,
            attempt=claim.attempt,
            at=outcome.started_at,
            duration_ms=int(outcome.duration_s * 1000),
            status_code=outcome.status_code,
            ok=outcome.ok,
            error=outcome.error,
        )
    )
    return str(values.get("state", PENDING))


def _queue_registrations(session: Session, now: datetime, limit: int = CLAIM_LIMIT) -> None:
    """A pending registration for every succeeded job that passed its gate and has none yet."""
    already = exists().where(Registration.job_id == Job.id, Registration.target == MLFLOW)
    job_ids = session.scalars(
        select(Job.id)
        .where(Job.state == JobState.SUCCEEDED.value, Job.gate_passed.is_(True), ~already)
        .limit(limit)
    ).all()
    for job_id in job_ids:
        try:
            with session.begin_nested():
                session.add(
                    Registration(
                        job_id=job_id,
                        target=MLFLOW,
                        state=PENDING,
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                    )
                )
                session.flush()
        except IntegrityError:  # another loop queued it first
            pass


class DeliveryLoop:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        *,
        registry: MlflowRegistry | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.policy = retry_policy(settings)
        self.registry = registry or (
            MlflowRegistry(settings.mlflow_tracking_uri) if settings.mlflow_tracking_uri else None
        )
        self.http = http or httpx.Client(timeout=self.policy.timeout_s, follow_redirects=False)

    @property
    def claim_for(self) -> timedelta:
        return timedelta(seconds=2 * self.policy.timeout_s + 5)

    def step(self) -> int:
        """One round: every due webhook delivery and registration; returns how many were attempted."""
        with transaction(self.sessions) as s:
            claims = claim_deliveries(s, utcnow(), self.claim_for)
        for claim in claims:
            outcome = attempt_delivery(
                claim.url,
                claim.secret,
                claim.event,
                claim.body,
                delivery_id=claim.id,
                attempt=claim.attempt,
                timeout_s=self.policy.timeout_s,
                allow_loopback=self.settings.webhook_allow_loopback,
                allowed_networks=self.settings.webhook_allowed_networks,
                client=self.http,
            )
            with transaction(self.sessions) as s:
                state = record_attempt(s, claim, outcome, self.policy)
            log.info(
                "webhook delivery %s attempt %d: %s → %s",
                claim.id,
                claim.attempt,
                outcome.status_code or outcome.error,
                state,
            )
        return len(claims) + (self._register() if self.registry else 0)

    def _register(self) -> int:
        assert self.registry is not None
        now = utcnow()
        with transaction(self.sessions) as s:
            _queue_registrations(s, now)
            rows = s.scalars(
                select(Registration)
                .where(_claimable(Registration, now), Registration.target == MLFLOW)
                .limit(CLAIM_LIMIT)
                .with_for_update(skip_locked=True)
            ).all()
            claims = []
            for row in rows:
                row.attempts += 1
                row.claimed_until = now + self.claim_for
                job = s.get(Job, row.job_id)
                if job is not None:
                    claims.append((row.job_id, row.attempts, _registration_request(job)))
        for job_id, attempt, request in claims:
            values: dict[str, Any]
            try:
                version = self.registry.register(**request)
                values = {
                    "state": SUCCEEDED,
                    "name": version.name,
                    "version": version.version,
                    "error": None,
                    "finished_at": utcnow(),
                }
            except MlflowError as e:
                last = attempt >= self.policy.max_attempts
                delay = next_backoff(self.policy, attempt)
                values = {
                    "error": str(e),
                    **(
                        {"state": FAILED, "finished_at": utcnow()}
                        if last
                        else {"next_attempt_at": utcnow() + timedelta(seconds=delay)}
                    ),
                }
                log.warning(
                    "registering job %s in MLflow failed (attempt %d): %s",
                    job_id,
                    attempt,
                    e,
                    extra={"job_id": job_id},
                )
            with transaction(self.sessions) as s:
                s.execute(
                    update(Registration)
                    .where(
                        Registration.job_id == job_id,
                        Registration.target == MLFLOW,
                        Registration.attempts == attempt,
                    )
                    .values(claimed_until=None, **values)
                    .execution_options(synchronize_session=False)
                )
        return len(claims)

    def run(self, stop: threading.Event) -> None:
        log.info("delivery loop started (MLflow %s)", "on" if self.registry else "off")
        while not stop.is_set():
            try:
                busy = self.step()
            except Exception:
                log.exception("delivery round failed; retrying")
                busy = 0
            stop.wait(0.05 if busy else self.settings.delivery_poll_seconds)
        self.http.close()


def _registration_request(job: Job) -> dict[str, Any]:
    spec, result = job.spec or {}, job.result or {}
    base = spec.get("base_model") or str(spec.get("model", "model"))
    return {
        "name": registered_model_name(
            base, str(spec.get("method")), int(spec.get("bits", 0)), int(spec.get("group_size", 0))
        ),
        "job_id": job.id,
        "source": job.output_uri or "",
        "metrics": result.get("eval"),
        "gate_passed": job.gate_passed,
        "extra_tags": {
            "quantfleet.owner": job.owner,
            "quantfleet.method": str(spec.get("method")),
            "quantfleet.bits": str(spec.get("bits")),
            "quantfleet.group_size": str(spec.get("group_size")),
            **({"quantfleet.batch_id": job.batch_id} if job.batch_id else {}),
        },
        "description": f"QuantFleet job {job.id}: {spec.get('method')} w{spec.get('bits')} g{spec.get('group_size')} of {base}",
    }


def start_in_thread(loop: DeliveryLoop) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), name="qf-deliveries", daemon=True)
    thread.start()
    return thread, stop
