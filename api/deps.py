"""Request dependencies: settings, database sessions and the authenticated caller."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.auth import LOCAL_PRINCIPAL, Principal, authenticate
from orchestrator.db import transaction
from orchestrator.queue.scoping import Owned, find_owned
from orchestrator.settings import Settings

bearer = HTTPBearer(auto_error=False, description="API key from `quantfleet keys create`")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_sessions(request: Request) -> sessionmaker[Session]:
    sessions: sessionmaker[Session] = request.app.state.sessions
    return sessions


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    if get_settings(request).no_auth:
        return LOCAL_PRINCIPAL
    if credentials is None:
        raise _unauthorized(
            "missing API key: send 'Authorization: Bearer <token>' (create one with `quantfleet keys create`)"
        )
    with transaction(get_sessions(request)) as session:
        principal = authenticate(session, credentials.credentials)
    if principal is None:
        raise _unauthorized("API key is invalid or revoked")
    return principal


def require(scope: str) -> Callable[[Principal], Principal]:
    """Dependency: the caller, who must hold `scope` (admin holds every scope)."""

    def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if not principal.allows(scope):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this API key lacks the '{scope}' scope")
        return principal

    return check


def visible_or_404(
    session: Session, model: type[Owned], row_id: str, principal: Principal, *, for_update: bool = False
) -> Owned:
    """The row if this key may see it; another owner's row answers 404 exactly like a missing one."""
    row = find_owned(session, model, row_id, principal.visible_owner, for_update=for_update)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{model.__name__.lower()} {row_id} not found")
    return row
