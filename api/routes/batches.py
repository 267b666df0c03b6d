"""/v1/batches: submit a matrix of jobs at once and follow it as one thing (counts per state, a metrics
row per job). A key sees only its owner's batches unless it is admin."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from sqlalchemy.orm import Session, sessionmaker

from api.deps import get_sessions, get_settings, require, visible_or_404
from api.fleet_schemas import BatchCreate, BatchJobRow, BatchOut, BatchPage, BatchSummaryOut
from api.job_bodies import validated_jobs
from api.routes.jobs import ERRORS
from api.schemas import Problem
from orchestrator.auth import Principal
from orchestrator.db import transaction
from orchestrator.fleet import batches
from orchestrator.queue import crud
from orchestrator.queue.models import Batch
from orchestrator.queue.states import TERMINAL
from orchestrator.settings import Settings

router = APIRouter(prefix="/v1", tags=["batches"])

Sessions = Annotated[sessionmaker[Session], Depends(get_sessions)]


def batch_out(session: Session, batch: Batch, request: Request) -> BatchOut:
    counts = batches.state_counts(session, batch.id)
    rows = batches.job_rows(session, batch.id)
    total = sum(counts.values())
    return BatchOut(
        id=batch.id,
        url=str(request.url_for("get_batch", batch_id=batch.id)),
        name=batch.name,
        owner=batch.owner,
        schedule_id=batch.schedule_id,
        fire_time=batch.fire_time,
        created_at=batch.created_at,
        total=total,
        done=sum(counts[s.value] for s in TERMINAL) == total,
        counts=counts,
        jobs=[BatchJobRow(url=str(request.url_for("get_job", job_id=r["job_id"])), **r) for r in rows],
    )


@router.post(
    "/batches",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BatchOut,
    responses={
        **ERRORS,
        422: {"model": Problem, "description": "A job of the matrix cannot run as specified"},
    },
)
def create_batch(
    body: BatchCreate,
    request: Request,
    response: Response,
    sessions: Sessions,
    settings: Annotated[Settings, Depends(get_settings)],
    principal: Annotated[Principal, Depends(require("submit"))],
) -> BatchOut:
    """Queue one job per matrix cell (models × methods × bits × group sizes over the template)."""
    validated = validated_jobs(body.template, body.matrix, settings, owner=principal.owner)
    specs = [spec for spec, _ in validated]
    with transaction(sessions) as session:
        crud.lock_owner(session, principal.owner)  # counted and used atomically: no racing past the cap
        active = crud.count_active_jobs(session, principal.owner)
        if active + len(specs) > settings.max_active_jobs_per_owner:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"{principal.owner} has {active} queued or running jobs; {len(specs)} more would pass the limit "
                f"of {settings.max_active_jobs_per_owner}: wait for some to finish or submit a smaller matrix",
            )
        batch, _ = batches.create_batch(
            session,
            owner=principal.owner,
            api_key_id=principal.key_id,
            specs=specs,
            plans=[plan for _, plan in validated],
            template=body.template,
            matrix=dict(body.matrix) if body.matrix else None,
            max_attempts=settings.max_attempts,
            name=body.name,
        )
        response.headers["Location"] = str(request.url_for("get_batch", batch_id=batch.id))
        return batch_out(session, batch, request)


@router.get("/batches", response_model=BatchPage, responses=ERRORS)
def list_batches(
    request: Request,
    sessions: Sessions,
    principal: Annotated[Principal, Depends(require("read"))],
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> BatchPage:
    """Batches visible to this key, newest first."""
    with transaction(sessions) as session:
        found = batches.list_batches(session, principal.visible_owner, limit)
        return BatchPage(
            batches=[
                BatchSummaryOut(
                    id=b.id,
                    url=str(request.url_for("get_batch", batch_id=b.id)),
                    name=b.name,
                    schedule_id=b.schedule_id,
                    fire_time=b.fire_time,
                    created_at=b.created_at,
                )
                for b in found
            ]
        )


@router.get("/batches/{batch_id}", response_model=BatchOut, responses=ERRORS)
def get_batch(
    batch_id: str,
    request: Request,
    sessions: Sessions,
    principal: Annotated[Principal, Depends(require("read"))],
) -> BatchOut:
    """Jobs per state and one row per job with its matrix cell, metrics and gate verdict."""
    with transaction(sessions) as session:
        return batch_out(session, visible_or_404(session, Batch, batch_id, principal), request)
