"""/v1/schedules: cron schedules that create a batch of jobs at each occurrence (nightly conversions).

The template and matrix are validated when the schedule is created or changed, with the same checks as
POST /v1/jobs, and stored as normalised job bodies; the scheduler adds the schedule id and fire time as
labels when it fires. Pausing clears next_fire_at; resuming computes it from now (occurrences while paused
are not missed fires, so no catch-up runs for them).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.deps import get_sessions, get_settings, require, visible_or_404
from api.fleet_schemas import FireOut, ScheduleCreate, ScheduleOut, SchedulePage, ScheduleUpdate
from api.job_bodies import validated_specs
from api.routes.jobs import ERRORS
from api.schemas import Problem
from orchestrator.auth import Principal
from orchestrator.db import transaction
from orchestrator.fleet.schedules import ScheduleError, next_fire_after, parse_cron, parse_tz, schedule_labels
from orchestrator.queue.models import Schedule, ScheduleFire, utcnow
from orchestrator.queue.scoping import owned_by
from orchestrator.settings import Settings

router = APIRouter(prefix="/v1", tags=["schedules"])

Sessions = Annotated[sessionmaker[Session], Depends(get_sessions)]
AppSettings = Annotated[Settings, Depends(get_settings)]
RECENT_FIRES = 10
# Counted against the label limit at validation time: every fire adds these two labels.
RESERVED = schedule_labels("0" * 32, datetime(2000, 1, 1, tzinfo=UTC))


def schedule_out(session: Session, schedule: Schedule, request: Request) -> ScheduleOut:
    fires = session.scalars(
        select(ScheduleFire)
        .where(ScheduleFire.schedule_id == schedule.id)
        .order_by(ScheduleFire.fire_time.desc())
        .limit(RECENT_FIRES)
    )
    return ScheduleOut(
        id=schedule.id,
        url=str(request.url_for("get_schedule", schedule_id=schedule.id)),
        name=schedule.name,
        owner=schedule.owner,
        cron=schedule.cron,
        tz=schedule.tz,
        missed_fire_policy=schedule.missed_fire_policy,
        paused=schedule.paused,
        next_fire_at=schedule.next_fire_at,
        last_fire_at=schedule.last_fire_at,
        template=schedule.template,
        matrix=schedule.matrix,
        jobs_per_fire=len(schedule.job_specs),
        recent_fires=[FireOut.model_validate(f, from_attributes=True) for f in fires],
        created_at=schedule.created_at,
        updated_at=schedule.updated_at,
    )


def _checked_timing(cron: str, tz: str) -> str:
    try:
        parse_tz(tz)
        parse_cron(cron)
    except ScheduleError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
    return " ".join(cron.split())


@router.post(
    "/schedules",
    status_code=status.HTTP_201_CREATED,
    response_model=ScheduleOut,
    responses={**ERRORS, 422: {"model": Problem, "description": "Bad cron, time zone, template or matrix"}},
)
def create_schedule(
    body: ScheduleCreate,
    request: Request,
    response: Response,
    sessions: Sessions,
    settings: AppSettings,
    principal: Annotated[Principal, Depends(require("submit"))],
) -> ScheduleOut:
    """A cron schedule (in a time zone) that queues the template's jobs at every occurrence."""
    cron = _checked_timing(body.cron, body.tz)
    specs = validated_specs(
        body.template, body.matrix, settings, owner=principal.owner, reserved_labels=RESERVED
    )
    now = utcnow()
    schedule = Schedule(
        id=uuid.uuid4().hex,
        owner=principal.owner,
        api_key_id=principal.key_id,
        name=body.name,
        cron=cron,
        tz=body.tz,
        template=body.template,
        matrix=dict(body.matrix) if body.matrix else None,
        job_specs=specs,
        missed_fire_policy=body.missed_fire_policy,
        paused=body.paused,
        next_fire_at=None if body.paused else next_fire_after(cron, body.tz, now),
        created_at=now,
        updated_at=now,
    )
    with transaction(sessions) as session:
        session.add(schedule)
        session.flush()
        response.headers["Location"] = str(request.url_for("get_schedule", schedule_id=schedule.id))
        return schedule_out(session, schedule, request)


@router.get("/schedules", response_model=SchedulePage, responses=ERRORS)
def list_schedules(
    request: Request, sessions: Sessions, principal: Annotated[Principal, Depends(require("read"))]
) -> SchedulePage:
    query = owned_by(select(Schedule), Schedule, principal.visible_owner)
    with transaction(sessions) as session:
        return SchedulePage(
            schedules=[
                schedule_out(session, s, request)
                for s in session.scalars(query.order_by(Schedule.created_at, Schedule.id))
            ]
        )


@router.get("/schedules/{schedule_id}", response_model=ScheduleOut, responses=ERRORS)
def get_schedule(
    schedule_id: str,
    request: Request,
    sessions: Sessions,
    principal: Annotated[Principal, Depends(require("read"))],
) -> ScheduleOut:
    """The schedule with its next_fire_at and most recent fires."""
    with transaction(sessions) as session:
        return schedule_out(
            session, visible_or_404(session, Schedule, schedule_id, principal, for_update=True), request
        )


@router.patch("/schedules/{schedule_id}", response_model=ScheduleOut, responses=ERRORS)
def update_schedule(
    schedule_id: str,
    body: ScheduleUpdate,
    request: Request,
    sessions: Sessions,
    settings: AppSettings,
    principal: Annotated[Principal, Depends(require("submit"))],
) -> ScheduleOut:
    """Change any of name, cron, tz, policy, template, matrix; next_fire_at is recomputed from now."""
    changes = body.model_dump(exclude_unset=True)
    with transaction(sessions) as session:
        schedule = visible_or_404(session, Schedule, schedule_id, principal, for_update=True)
        cron = _checked_timing(changes.get("cron", schedule.cron), changes.get("tz", schedule.tz))
        if "template" in changes or "matrix" in changes:
            template = changes.get("template", schedule.template)
            matrix = changes.get("matrix", schedule.matrix)
            schedule.job_specs = validated_specs(
                template, matrix, settings, owner=schedule.owner, reserved_labels=RESERVED
            )
            schedule.template, schedule.matrix = template, dict(matrix) if matrix else None
        for field in ("name", "tz", "missed_fire_policy"):
            if field in changes:
                setattr(schedule, field, changes[field])
        schedule.cron = cron
        if not schedule.paused:
            schedule.next_fire_at = next_fire_after(schedule.cron, schedule.tz, utcnow())
        schedule.updated_at = utcnow()
        session.flush()
        return schedule_out(session, schedule, request)


@router.delete("/schedules/{schedule_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS)
def delete_schedule(
    schedule_id: str, sessions: Sessions, principal: Annotated[Principal, Depends(require("submit"))]
) -> Response:
    """Stop firing; jobs and batches it created stay."""
    with transaction(sessions) as session:
        session.delete(visible_or_404(session, Schedule, schedule_id, principal, for_update=True))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/schedules/{schedule_id}/pause", response_model=ScheduleOut, responses=ERRORS)
def pause_schedule(
    schedule_id: str,
    request: Request,
    sessions: Sessions,
    principal: Annotated[Principal, Depends(require("submit"))],
) -> ScheduleOut:
    with transaction(sessions) as session:
        schedule = visible_or_404(session, Schedule, schedule_id, principal, for_update=True)
        schedule.paused, schedule.next_fire_at, schedule.updated_at = True, None, utcnow()
        session.flush()
        return schedule_out(session, schedule, request)


@router.post("/schedules/{schedule_id}/resume", response_model=ScheduleOut, responses=ERRORS)
def resume_schedule(
    schedule_id: str,
    request: Request,
    sessions: Sessions,
    principal: Annotated[Principal, Depends(require("submit"))],
) -> ScheduleOut:
    with transaction(sessions) as session:
        schedule = visible_or_404(session, Schedule, schedule_id, principal, for_update=True)
        if schedule.paused:
            now = utcnow()
            schedule.paused, schedule.updated_at = False, now
            schedule.next_fire_at = next_fire_after(schedule.cron, schedule.tz, now)
        session.flush()
        return schedule_out(session, schedule, request)
