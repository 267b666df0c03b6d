"""GET /metrics in the Prometheus text format (queue depth by state, job durations, failures, retries,
GPU-seconds). Unauthenticated, like most scrape targets, and without per-owner or per-job data; restrict
who can reach it at the network level (infra/ keeps it inside the cluster)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db import transaction
from orchestrator.metrics import ServiceMetrics
from orchestrator.queue.models import Job

router = APIRouter(tags=["operations"])


def queue_depth(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Jobs per state, counted at scrape time (so it is right whichever process changed a job)."""
    with transaction(sessions) as session:
        rows = session.execute(select(Job.state, func.count()).group_by(Job.state))
        return {state: int(count) for state, count in rows}


def watch_queue(service_metrics: ServiceMetrics, sessions: sessionmaker[Session]) -> ServiceMetrics:
    service_metrics.watch_queue(lambda: queue_depth(sessions))
    return service_metrics


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
