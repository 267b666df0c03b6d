"""API keys: `qf_<key id>_<secret>` tokens, scoped, stored as a SHA-256 hash of the secret.

The secret has 256 bits of entropy, so a plain SHA-256 (not a slow password hash) is enough to make a
leaked database useless, and keeps every request's check cheap. The token is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from orchestrator.queue.models import ApiKey, utcnow

SCOPES = ("submit", "read", "admin")
TOKEN_PREFIX = "qf"
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the owner their jobs belong to and what they may do."""

    owner: str
    scopes: frozenset[str]
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or self.is_admin

    @property
    def visible_owner(self) -> str | None:
        """Owner filter for reads: None (everything) for admins."""
        return None if self.is_admin else self.owner


LOCAL_PRINCIPAL = Principal(owner="local", scopes=frozenset(SCOPES))  # --no-auth mode


def parse_scopes(text: str) -> list[str]:
    scopes = sorted({s.strip() for s in text.split(",") if s.strip()})
    unknown = [s for s in scopes if s not in SCOPES]
    if not scopes or unknown:
        raise ValueError(f"scopes must be a comma-separated subset of {','.join(SCOPES)}; got {text!r}")
    return scopes


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_api_key(session: Session, *, owner: str, scopes: list[str]) -> str:
    """Store a new key and return its token (the only time the secret is visible)."""
    owner = owner.strip()
    if not owner or len(owner) > 128:
        raise ValueError("owner must be 1 to 128 characters")
    parse_scopes(",".join(scopes))
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    session.add(
        ApiKey(id=key_id, secret_hash=_hash(secret), owner=owner, scopes=sorted(scopes), created_at=utcnow())
    )
    return f"{TOKEN_PREFIX}_{key_id}_{secret}"


def authenticate(session: Session, token: str) -> Principal | None:
    """The principal for a bearer token, or None if it is malformed, unknown, revoked or wrong."""
    prefix, _, rest = token.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not key_id or not secret:
        return None
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None or not hmac.compare_digest(key.secret_hash, _hash(secret)):
        return None
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:  # not a write per request
        session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now))
    return Principal(owner=key.owner, scopes=frozenset(key.scopes), key_id=key.id)


def revoke_api_key(session: Session, key_id: str) -> bool:
    key = session.scalars(select(ApiKey).where(ApiKey.id == key_id)).one_or_none()
    if key is None:
        return False
    key.revoked_at = utcnow()
    return True
