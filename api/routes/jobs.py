"""/v1/jobs: submit, list, read, cancel, events and artifacts. A key sees only its owner's jobs (unless
admin); another owner's job answers 404, exactly like a job that does not exist."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from pydantic import StringConstraints
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from api.deps import get_sessions, get_settings, require, visible_or_404
from api.event_stream import EventHub, EventStreamResponse, StreamSlots, job_event_stream
from api.schemas import (
    MAX_INT64,
    ArtifactOut,
    EventOut,
    JobCreate,
    JobOut,
    JobPage,
    JobPlanOut,
    Problem,
    ProgressOut,
    ReportSummary,
)
from api.thread_slots import ThreadSlots
from orchestrator.auth import Principal
from orchestrator.db import transaction
from orchestrator.queue import crud
from orchestrator.queue.models import Job, JobEvent
from orchestrator.queue.specs import request_hash
from orchestrator.queue.states import JobState
from orchestrator.queue.submission import validate_submission
from orchestrator.settings import Settings
from workers.errors import InputError, InvalidSpecError

router = APIRouter(prefix="/v1", tags=["jobs"])

Sessions = Annotated[sessionmaker[Session], Depends(get_sessions)]
AppSettings = Annotated[Settings, Depends(get_settings)]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or invalid API key"},
    403: {"model": Problem, "description": "The key lacks the needed scope"},
    404: {"model": Problem, "description": "No such job (or it belongs to another key's owner)"},
}


_JOB_URL_TEMPLATES: dict[str, str] = {}  # base URL -> the job URL with a placeholder id; a few hosts at most


def job_url(request: Request, job_id: str) -> str:
    """The job's URL, from a template per base URL (Starlette's url_for tries every route in turn)."""
    base = str(request.base_url)
    template = _JOB_URL_TEMPLATES.get(base)
    if template is None:
        template = str(request.url_for("get_job", job_id="0"))
        if len(_JOB_URL_TEMPLATES) < 16:  # the Host header is the client's: never an unbounded cache
            _JOB_URL_TEMPLATES[base] = template
    if not job_id.isalnum():
        return str(request.url_for("get_job", job_id=job_id))
    return template[:-1] + job_id


def job_out(job: Job, request: Request) -> JobOut:
    result = job.result or {}
    succeeded = job.state == JobState.SUCCEEDED.value
    return JobOut(
        id=job.id,
        url=job_url(request, job.id),
        state=job.state,  # type: ignore[arg-type]
        owner=job.owner,
        priority=job.priority,
        labels={label.key: label.value for label in job.labels},
        spec=job.spec,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        progress=ProgressOut.from_row(job.progress),
        error=job.error,
        metrics=result.get("eval") if succeeded else None,
        report=ReportSummary.model_validate(result) if succeeded and result else None,
        output_uri=job.output_uri,
        gate=job.gate_result,
        plan=JobPlanOut.model_validate(job.plan) if job.plan else None,
        batch_id=job.batch_id,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def _same_or_conflict(job: Job, digest: str, key: str) -> Job:
    if job.request_hash != digest:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"Idempotency-Key {key!r} was already used for job {job.id} with a different request body; "
            "use a new key for a different job",
        )
    return job


@router.post(
    "/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses={**ERRORS, 422: {"model": Problem, "description": "The job cannot run as specified"}},
)
async def submit_job(
    body: JobCreate,
    request: Request,
    response: Response,
    sessions: Sessions,
    settings: AppSettings,
    principal: Annotated[Principal, Depends(require("submit"))],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=255,
            pattern=r"^[\x20-\x7e]+$",
            description="Printable ASCII, at most 255 characters",
        ),
    ] = None,
) -> JobOut:
    """Queue a quantization job. Same Idempotency-Key and body → the same job; same key, other body → 422."""
    slots: ThreadSlots = request.app.state.submit_slots  # QF_SUBMIT_THREADS at once, the rest wait their turn
    return await slots.run(_submit, body, request, response, sessions, settings, principal, idempotency_key)


def _submit(
    body: JobCreate,
    request: Request,
    response: Response,
    sessions: sessionmaker[Session],
    settings: Settings,
    principal: Principal,
    idempotency_key: str | None,
) -> JobOut:
    """The submit itself, on a worker thread: the checks (file system, the model's preflight) and the
    database calls block."""
    spec = body.model_dump(mode="json")
    digest = request_hash(spec)
    if idempotency_key:
        with transaction(sessions) as session:
            existing = crud.find_by_idempotency_key(session, principal.owner, idempotency_key)
            if existing is not None:
                job = _same_or_conflict(existing, digest, idempotency_key)
                response.headers["Location"] = str(request.url_for("get_job", job_id=job.id))
                return job_out(job, request)
    try:
        plan = validate_submission(spec, settings, owner=principal.owner)
    except (InvalidSpecError, InputError) as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
    try:
        job = crud.submit_job(  # counted and inserted in one step per owner: no racing past the cap
            sessions,
            owner=principal.owner,
            api_key_id=principal.key_id,
            spec=spec,
            request_hash=digest,
            max_attempts=settings.max_attempts,
            priority=body.priority,
            labels=body.labels,
            idempotency_key=idempotency_key,
            plan=plan,
            cap=settings.max_active_jobs_per_owner,
        )
    except crud.OwnerCapReached:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"{principal.owner} already has {settings.max_active_jobs_per_owner} queued or running jobs; "
            "wait for some to finish",
        ) from None
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the insert
        with transaction(sessions) as session:
            existing = crud.find_by_idempotency_key(session, principal.owner, idempotency_key or "")
            if existing is None:
                raise
            job = _same_or_conflict(existing, digest, idempotency_key or "")
    out = job_out(job, request)
    # Already a JobOut: encoded by pydantic as is, without FastAPI validating it a second time against the
    # model and without a detour through a dict and json.dumps.
    return Response(  # type: ignore[return-value]
        out.model_dump_json(),
        status_code=status.HTTP_202_ACCEPTED,
        headers={"Location": out.url},
        media_type="application/json",
    )


@router.get("/jobs", response_model=JobPage, responses=ERRORS)
def list_jobs(
    request: Request,
    sessions: Sessions,
    principal: Annotated[Principal, Depends(require("read"))],
    state: Annotated[
        list[JobState] | None, Query(max_length=len(JobState), description="Only jobs in these states")
    ] = None,
    label: Annotated[
        list[Annotated[str, StringConstraints(max_length=320)]] | None,
        Query(max_length=32, description="key=value; repeat to require several (at most 32)"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page")
    ] = None,
) -> JobPage:
    """Jobs visible to this key, newest first."""
    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"label filter {item!r} must be key=value"
            )
        labels[key] = value
    with transaction(sessions) as session:
        try:
            jobs, next_cursor = crud.list_jobs(
                session,
                owner=principal.visible_owner,
                states=[s.value for s in state or []],
                labels=labels,
                limit=limit,
                cursor=cursor,
            )
        except ValueError as e:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
        return JobPage(jobs=[job_out(j, request) for j in jobs], next_cursor=next_cursor)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=ERRORS)
def get_job(
    job_id: str,
    request: Request,
    sessions: Sessions,
    principal: Annotated[Principal, Depends(require("read"))],
) -> JobOut:
    """State, progress (stage and layer i/N), attempts, error, and metrics once succeeded."""
    with transaction(sessions) as session:
        return job_out(visible_or_404(session, Job, job_id, principal), request)


@router.post(
    "/jobs/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, responses=ERRORS
)
def cancel_job(
    job_id: str,
    request: Request,
    sessions: Sessions,
    principal: Annotated[Principal, Depends(require("submit"))],
) -> JobOut:
    """Queued → cancelled at once; running → cancelling, and the worker stops at its next layer boundary."""
    with transaction(sessions) as session:
        job = crud.request_cancel(session, visible_or_404(session, Job, job_id, principal))
        return job_out(job, request)


def event_out(event: JobEvent) -> EventOut:
    out = EventOut.model_validate(event, from_attributes=True)
    if out.layer is not None:
        out.layer += 1  # 1-based, like the job's progress
    return out


@router.get(
    "/jobs/{job_id}/events",
    response_model=list[EventOut],
    responses={
        **ERRORS,
        200: {"content": {"text/event-stream": {}}, "description": "JSON list, or SSE with follow"},
        429: {"model": Problem, "description": "This API key already holds its most open event streams"},
    },
)
def job_events(
    job_id: str,
    request: Request,
    sessions: Sessions,
    principal: Annotated[Principal, Depends(require("read"))],
    after: Annotated[
        int, Query(ge=0, le=MAX_INT64, description="Only events with a larger id (for polling)")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    follow: Annotated[
        bool,
        Query(
            description="Stream as Server-Sent Events until the job ends (last event: `end`; `error` when "
            "the stream cannot go on: reconnect with Last-Event-ID)"
        ),
    ] = False,
    last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0, le=MAX_INT64)] = None,
) -> list[EventOut] | Response:
    """State changes, attempt starts and progress, oldest first."""
    with transaction(sessions) as session:
        visible_or_404(session, Job, job_id, principal)
        if not follow:
            return [event_out(e) for e in crud.list_events(session, job_id, after=after, limit=limit)]
    slots: StreamSlots = request.app.state.stream_slots
    hub: EventHub = request.app.state.event_hub
    key = principal.key_id or f"owner:{principal.owner}"
    if not slots.take(key):
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"this API key already has {slots.limit} open event streams, the most one key may hold; "
            "close one, or poll GET /v1/jobs/{id}/events?after=<last id> instead",
            headers={"Retry-After": "5"},
        )
    start = max(after, last_event_id or 0)
    return EventStreamResponse(
        job_event_stream(hub, job_id, start, event_out), release=lambda: slots.give_back(key)
    )


@router.get("/jobs/{job_id}/artifacts", response_model=list[ArtifactOut], responses=ERRORS)
def job_artifacts(
    job_id: str, sessions: Sessions, principal: Annotated[Principal, Depends(require("read"))]
) -> list[ArtifactOut]:
    """Every file the job published, with sha256 and size (empty until it succeeds)."""
    with transaction(sessions) as session:
        visible_or_404(session, Job, job_id, principal)
        return [
            ArtifactOut.model_validate(a, from_attributes=True) for a in crud.list_artifacts(session, job_id)
        ]
