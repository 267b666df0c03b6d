"""/v1/webhooks: signed POSTs to a receiver when a job succeeds, fails, or fails its quality gate, with
every delivery and each of its attempts listable. A webhook sees its owner's jobs; an admin key may
create one for every owner's jobs (`all_owners`), e.g. for the model registry."""

from __future__ import annotations

import secrets
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.deps import get_sessions, get_settings, require, visible_or_404
from api.fleet_schemas import DeliveryOut, DeliveryPage, WebhookCreate, WebhookOut, WebhookPage, WebhookUpdate
from api.routes.jobs import ERRORS
from api.schemas import Problem
from orchestrator.auth import Principal
from orchestrator.db import transaction
from orchestrator.fleet.webhooks import WebhookError, check_events, check_webhook_url
from orchestrator.queue.models import Webhook, WebhookDelivery, utcnow
from orchestrator.queue.scoping import owned_by
from orchestrator.settings import Settings

router = APIRouter(prefix="/v1", tags=["webhooks"])

Sessions = Annotated[sessionmaker[Session], Depends(get_sessions)]
AppSettings = Annotated[Settings, Depends(get_settings)]


def webhook_out(hook: Webhook, *, secret: str | None = None) -> WebhookOut:
    return WebhookOut(
        id=hook.id,
        url=hook.url,
        owner=hook.owner,
        events=hook.events,
        all_owners=hook.all_owners,
        active=hook.active,
        created_at=hook.created_at,
        secret=secret,
    )


def _checked(
    url: str | None, events: list[str] | None, settings: Settings
) -> tuple[str | None, list[str] | None]:
    try:
        return (
            check_webhook_url(
                url,
                allow_loopback=settings.webhook_allow_loopback,
                allowed_networks=settings.webhook_allowed_networks,
            )
            if url is not None
            else None,
            check_events(events) if events is not None else None,
        )
    except WebhookError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e


@router.post(
    "/webhooks",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookOut,
    responses={**ERRORS, 422: {"model": Problem, "description": "URL not allowed or unknown event"}},
)
def create_webhook(
    body: WebhookCreate,
    sessions: Sessions,
    settings: AppSettings,
    principal: Annotated[Principal, Depends(require("submit"))],
) -> WebhookOut:
    """Register a receiver. The response carries the signing secret; it is not shown again."""
    if body.all_owners and not principal.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "all_owners webhooks need an admin key")
    url, events = _checked(body.url, body.events, settings)
    secret = body.secret or f"whsec_{secrets.token_urlsafe(32)}"
    hook = Webhook(
        id=uuid.uuid4().hex,
        owner=principal.owner,
        url=url or body.url,
        secret=secret,
        events=events or [],
        all_owners=body.all_owners,
        active=True,
        created_at=utcnow(),
    )
    with transaction(sessions) as session:
        session.add(hook)
    return webhook_out(hook, secret=secret)


@router.get("/webhooks", response_model=WebhookPage, responses=ERRORS)
def list_webhooks(
    sessions: Sessions, principal: Annotated[Principal, Depends(require("read"))]
) -> WebhookPage:
    query = owned_by(select(Webhook), Webhook, principal.visible_owner).order_by(
        Webhook.created_at, Webhook.id
    )
    with transaction(sessions) as session:
        return WebhookPage(webhooks=[webhook_out(h) for h in session.scalars(query)])


@router.get("/webhooks/{webhook_id}", response_model=WebhookOut, responses=ERRORS)
def get_webhook(
    webhook_id: str, sessions: Sessions, principal: Annotated[Principal, Depends(require("read"))]
) -> WebhookOut:
    with transaction(sessions) as session:
        return webhook_out(visible_or_404(session, Webhook, webhook_id, principal))


@router.patch("/webhooks/{webhook_id}", response_model=WebhookOut, responses=ERRORS)
def update_webhook(
    webhook_id: str,
    body: WebhookUpdate,
    sessions: Sessions,
    settings: AppSettings,
    principal: Annotated[Principal, Depends(require("submit"))],
) -> WebhookOut:
    """Change the URL or events, or pause deliveries (`active: false`; pending ones wait until re-activated)."""
    url, events = _checked(body.url, body.events, settings)
    with transaction(sessions) as session:
        hook = visible_or_404(session, Webhook, webhook_id, principal)
        if url is not None:
            hook.url = url
        if events is not None:
            hook.events = events
        if body.active is not None:
            hook.active = body.active
        session.flush()
        return webhook_out(hook)


@router.delete("/webhooks/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS)
def delete_webhook(
    webhook_id: str, sessions: Sessions, principal: Annotated[Principal, Depends(require("submit"))]
) -> Response:
    """Remove the webhook with its delivery log."""
    with transaction(sessions) as session:
        session.delete(visible_or_404(session, Webhook, webhook_id, principal))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/webhooks/{webhook_id}/deliveries", response_model=DeliveryPage, responses=ERRORS)
def list_deliveries(
    webhook_id: str,
    request: Request,
    sessions: Sessions,
    principal: Annotated[Principal, Depends(require("read"))],
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> DeliveryPage:
    """Deliveries newest first, each with every attempt made (status, error, duration)."""
    with transaction(sessions) as session:
        visible_or_404(session, Webhook, webhook_id, principal)
        rows = session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.webhook_id == webhook_id)
            .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id)
            .limit(limit)
        )
        return DeliveryPage(deliveries=[DeliveryOut.model_validate(d, from_attributes=True) for d in rows])
