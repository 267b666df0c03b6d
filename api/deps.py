"""Request dependencies: settings, database sessions and the authenticated caller.

The light ones are coroutines: FastAPI runs a plain `def` dependency on its thread pool, and a hop there
and back costs more than these functions do. Only a key that is not in the key cache (`KeyCache`) reads
the database, on the thread pool.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.auth import LOCAL_PRINCIPAL, Principal, authenticate
from orchestrator.db import transaction
from orchestrator.queue.scoping import Owned, find_owned
from orchestrator.settings import Settings

bearer = HTTPBearer(auto_error=False, description="API key from `quantfleet keys create`")


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def sessions_of(request: Request) -> sessionmaker[Session]:
    sessions: sessionmaker[Session] = request.app.state.sessions
    return sessions


async def get_settings(request: Request) -> Settings:
    return settings_of(request)


async def get_sessions(request: Request) -> sessionmaker[Session]:
    return sessions_of(request)


class KeyCache:
    """Principals of recently checked API keys, for `seconds` (QF_AUTH_CACHE_SECONDS; 0: none), so a
    client sending request after request costs one key lookup every few seconds, not one per request.
    Keyed by the token's SHA-256; only valid keys are kept (an unknown or revoked key is looked up every
    time). A key revoked meanwhile is refused by this API process at most `seconds` later."""

    def __init__(self, seconds: float, size: int = 4096) -> None:
        self.seconds, self.size = seconds, size
        self._entries: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

    def get(self, token: str) -> Principal | None:
        if self.seconds <= 0:
            return None
        key = self._key(token)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] < time.monotonic():
                del self._entries[key]
                return None
            return entry[1]

    def put(self, token: str, principal: Principal) -> None:
        if self.seconds <= 0:
            return
        with self._lock:
            self._entries[self._key(token)] = (time.monotonic() + self.seconds, principal)
            self._entries.move_to_end(self._key(token))
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def _authenticate(request: Request, token: str) -> Principal | None:
    with transaction(sessions_of(request)) as session:
        return authenticate(session, token)


async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    if settings_of(request).no_auth:
        return LOCAL_PRINCIPAL
    if credentials is None:
        raise _unauthorized(
            "missing API key: send 'Authorization: Bearer <token>' (create one with `quantfleet keys create`)"
        )
    cache: KeyCache = request.app.state.key_cache
    principal = cache.get(credentials.credentials)
    if principal is None:
        principal = await run_in_threadpool(_authenticate, request, credentials.credentials)
        if principal is None:
            raise _unauthorized("API key is invalid or revoked")
        cache.put(credentials.credentials, principal)
    return principal


def require(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    """Dependency: the caller, who must hold `scope` (admin holds every scope)."""

    async def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
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
