"""Liveness and readiness. Unauthenticated, and they reveal nothing beyond up/down and the schema revision."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import text

from orchestrator.db import migration_status

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up. Answered on the event loop itself: never queued behind the request threads."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Database unreachable or migrations not current"}})
def readyz(request: Request, response: Response) -> dict[str, Any]:
    """Ready to serve: the database answers and its schema is at the newest migration."""
    engine = request.app.state.engine
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        current, head = migration_status(engine)
    except Exception as e:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "unavailable", "database": f"unreachable: {type(e).__name__}"}
    if current != head:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {
            "status": "unavailable",
            "database": "ok",
            "migrations": f"database at {current}, code expects {head}: run `quantfleet migrate`",
        }
    return {"status": "ready", "database": "ok", "migrations": current}
