"""Turn a job template plus matrix into validated job request bodies, with the same checks as
POST /v1/jobs (schema, engine rules, inputs inside the allow-list), each error naming the matrix cell."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException, status
from pydantic import ValidationError

from api.schemas import JobCreate
from orchestrator.fleet.schedules import ScheduleError, expand_matrix
from orchestrator.queue.submission import validate_submission
from orchestrator.settings import Settings
from workers.errors import InputError, InvalidSpecError


def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail)


def _where(cell: Mapping[str, Any]) -> str:
    return "job " + " ".join(f"{k}={v}" for k, v in cell.items()) if cell else "job"


def validated_specs(
    template: Mapping[str, Any],
    matrix: Mapping[str, Any] | None,
    settings: Settings,
    *,
    owner: str,
    reserved_labels: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The request bodies of `validated_jobs`, without their plans."""
    return [spec for spec, _ in validated_jobs(template, matrix, settings, owner=owner, reserved_labels=reserved_labels)]


def validated_jobs(
    template: Mapping[str, Any],
    matrix: Mapping[str, Any] | None,
    settings: Settings,
    *,
    owner: str,
    reserved_labels: Mapping[str, str] | None = None,
) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Normalised request bodies (defaults filled in, as stored in jobs.spec), one per matrix cell, each
    with its preflight plan (None for a model the worker downloads), as POST /v1/jobs stores it.

    `owner`: whose jobs these will be (an output.uri must lie in that owner's folder). `reserved_labels`
    are counted against the label limit but not stored (a schedule adds its id and fire time only when it
    fires)."""
    try:
        cells = expand_matrix(
            template, matrix, extra_labels=reserved_labels, max_jobs=settings.max_matrix_jobs
        )
    except ScheduleError as e:
        raise _unprocessable(str(e)) from e
    jobs: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    for cell in cells:
        body = dict(cell.body)
        body["labels"] = {k: v for k, v in body["labels"].items() if k not in (reserved_labels or {})}
        try:
            spec = JobCreate.model_validate(body).model_dump(mode="json")
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
            )
            raise _unprocessable(f"{_where(cell.cell)}: {problems}") from e
        try:
            plan = validate_submission(spec, settings, owner=owner)
        except (InvalidSpecError, InputError) as e:
            raise _unprocessable(f"{_where(cell.cell)}: {e}") from e
        jobs.append((spec, plan))
    return jobs
