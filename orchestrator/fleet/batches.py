"""Batches: a matrix of jobs created together (POST /v1/batches, or one schedule fire), and the summary
GET /v1/batches/{id} shows: how many jobs are in each state and one metrics row per job, so the cells of
a matrix (method × bits × group size) can be compared at a glance."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from orchestrator.queue import crud
from orchestrator.queue.models import Batch, Job, utcnow
from orchestrator.queue.scoping import owned_by
from orchestrator.queue.specs import request_hash
from orchestrator.queue.states import JobState

METRIC_COLUMNS = ("ppl_original", "ppl_quantized", "delta_ppl_pct", "kl_mean", "kl_p99", "top1_agreement")


def create_batch(
    session: Session,
    *,
    owner: str,
    specs: Sequence[dict[str, Any]],
    template: dict[str, Any],
    matrix: dict[str, Any] | None,
    max_attempts: int,
    api_key_id: str | None = None,
    name: str | None = None,
    schedule_id: str | None = None,
    fire_time: datetime | None = None,
    plans: Sequence[dict[str, Any] | None] | None = None,
) -> tuple[Batch, list[Job]]:
    """A batch row and one queued job per validated spec (the API's normalised request bodies), each job
    storing its preflight plan from `plans` (same order as `specs`) where one is given."""
    if plans is not None and len(plans) != len(specs):
        raise ValueError(f"{len(plans)} plans for {len(specs)} specs")
    batch = Batch(
        id=uuid.uuid4().hex,
        owner=owner,
        name=name,
        template=template,
        matrix=matrix,
        schedule_id=schedule_id,
        fire_time=fire_time,
        created_at=utcnow(),
    )
    session.add(batch)
    session.flush()
    jobs = []
    for i, spec in enumerate(specs):
        job = crud.create_job(
            session,
            owner=owner,
            spec=spec,
            request_hash=request_hash(spec),
            max_attempts=max_attempts,
            priority=int(spec.get("priority", 0)),
            labels=dict(spec.get("labels") or {}),
            api_key_id=api_key_id,
            plan=plans[i] if plans is not None else None,
        )
        job.batch_id = batch.id
        jobs.append(job)
    session.flush()
    return batch, jobs


def list_batches(session: Session, owner: str | None, limit: int = 50) -> list[Batch]:
    query = owned_by(select(Batch), Batch, owner)
    return list(session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)))


def state_counts(session: Session, batch_id: str) -> dict[str, int]:
    """Jobs of the batch per state; every state is present, so clients need no defaults."""
    rows = session.execute(
        select(Job.state, func.count()).where(Job.batch_id == batch_id).group_by(Job.state)
    )
    counts = {state.value: 0 for state in JobState}
    counts.update({state: int(count) for state, count in rows})
    return counts


def job_rows(session: Session, batch_id: str) -> list[dict[str, Any]]:
    """One row per job: its matrix cell, state, metrics, gate verdict, size and duration."""
    jobs = session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.created_at, Job.id))
    rows = []
    for job in jobs:
        spec, result = job.spec or {}, job.result or {}
        metrics = result.get("eval") or {}
        duration = (
            (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else None
        )
        rows.append(
            {
                "job_id": job.id,
                "state": job.state,
                "model": spec.get("model"),
                "method": spec.get("method"),
                "bits": spec.get("bits"),
                "group_size": spec.get("group_size"),
                **{name: metrics.get(name) for name in METRIC_COLUMNS},
                "gate_passed": job.gate_passed,
                "bytes_quantized": result.get("bytes_quantized"),
                "duration_s": duration,
                "attempts": job.attempts,
                "error": job.error,
                "output_uri": job.output_uri,
            }
        )
    return rows
