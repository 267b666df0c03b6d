"""GET /v1/artifacts: finished artifacts a model registry can index (pull side of the registry
integration): per succeeded job its URIs, the sha256 of every file (the manifest), metrics and gate
verdict, filterable by model, method, bits, group size and gate."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from api.deps import get_sessions, require
from api.fleet_schemas import ArtifactPage, ArtifactSetOut
from api.routes.jobs import ERRORS
from api.schemas import ArtifactOut
from orchestrator.auth import Principal
from orchestrator.db import transaction
from orchestrator.queue.models import Artifact, Job
from orchestrator.queue.scoping import newest_first_page, owned_by
from orchestrator.queue.states import JobState

router = APIRouter(prefix="/v1", tags=["artifacts"])

Sessions = Annotated[sessionmaker[Session], Depends(get_sessions)]


def _artifact_set(job: Job, files: list[Artifact], request: Request) -> ArtifactSetOut:
    spec = job.spec or {}
    manifest = next((f.uri for f in files if f.kind == "manifest"), None)
    return ArtifactSetOut(
        job_id=job.id,
        job_url=str(request.url_for("get_job", job_id=job.id)),
        owner=job.owner,
        model=spec.get("model", ""),
        base_model=spec.get("base_model"),
        method=spec.get("method", ""),
        bits=int(spec.get("bits", 0)),
        group_size=int(spec.get("group_size", 0)),
        labels={label.key: label.value for label in job.labels},
        output_uri=job.output_uri,
        manifest_uri=manifest,
        finished_at=job.finished_at,
        metrics=(job.result or {}).get("eval"),
        gate=job.gate_result,
        files=[ArtifactOut.model_validate(f, from_attributes=True) for f in files],
    )


@router.get("/artifacts", response_model=ArtifactPage, responses=ERRORS)
def list_artifacts(
    request: Request,
    sessions: Sessions,
    principal: Annotated[Principal, Depends(require("read"))],
    model: Annotated[
        str | None,
        Query(max_length=4096, description="Model URI, its last path segment, or base_model"),
    ] = None,
    method: Annotated[Literal["gptq", "awq", "rtn", "awq-gptq"] | None, Query()] = None,
    bits: Annotated[int | None, Query(ge=1, le=64)] = None,
    group_size: Annotated[int | None, Query(ge=-1, le=2**31 - 1)] = None,
    gate: Annotated[
        Literal["passed", "failed", "none"] | None,
        Query(description="passed / failed: the job's quality gate verdict; none: jobs without a gate"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page")
    ] = None,
) -> ArtifactPage:
    """Artifacts of succeeded jobs visible to this key, newest first."""
    query = owned_by(select(Job), Job, principal.visible_owner).where(Job.state == JobState.SUCCEEDED.value)
    if model:
        model_uri = Job.spec["model"].as_string()
        query = query.where(
            or_(
                model_uri == model,
                model_uri == model.rstrip("/") + "/",
                model_uri.like("%/" + model.strip("/")),
                model_uri.like("%/" + model.strip("/") + "/"),
                Job.spec["base_model"].as_string() == model,
            )
        )
    if method:
        query = query.where(Job.spec["method"].as_string() == method)
    if bits is not None:
        query = query.where(Job.spec["bits"].as_integer() == bits)
    if group_size is not None:
        query = query.where(Job.spec["group_size"].as_integer() == group_size)
    if gate == "passed":
        query = query.where(Job.gate_passed.is_(True))
    elif gate == "failed":
        query = query.where(Job.gate_passed.is_(False))
    elif gate == "none":
        query = query.where(Job.gate_passed.is_(None))
    with transaction(sessions) as session:
        try:
            jobs, next_cursor = newest_first_page(session, query, Job, limit=limit, cursor=cursor)
        except ValueError as e:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
        files: dict[str, list[Artifact]] = {job.id: [] for job in jobs}
        for artifact in session.scalars(
            select(Artifact).where(Artifact.job_id.in_(list(files))).order_by(Artifact.job_id, Artifact.path)
        ):
            files[artifact.job_id].append(artifact)
        return ArtifactPage(
            artifacts=[_artifact_set(job, files[job.id], request) for job in jobs], next_cursor=next_cursor
        )
