"""Owner scoping and keyset pagination, shared by every lookup and listing of owned rows (jobs, batches,
schedules, webhooks): a key sees only its owner's rows (owner None = admin, sees them all), and pages run
newest first on (created_at, id), so they stay stable while rows are added."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from orchestrator.queue.models import Batch, Job, Schedule, Webhook

Owned = TypeVar("Owned", Job, Batch, Schedule, Webhook)


def owned_by(query: Select[Owned], model: type[Owned], owner: str | None) -> Select[Owned]:
    """`query` narrowed to `owner`'s rows; unchanged for owner None (admin)."""
    return query if owner is None else query.where(model.owner == owner)


def find_owned(
    session: Session, model: type[Owned], row_id: str, owner: str | None, *, for_update: bool = False
) -> Owned | None:
    """The row, if it exists and `owner` may see it; `for_update` locks it for the transaction."""
    query = owned_by(select(model).where(model.id == row_id), model, owner)
    return session.scalars(query.with_for_update() if for_update else query).one_or_none()


def encode_cursor(row: Job | Batch | Schedule | Webhook) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raises ValueError when the cursor was not produced by encode_cursor."""
    try:
        created, row_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        at = datetime.fromisoformat(created)
        if at.tzinfo is None or at.utcoffset() is None or not isinstance(row_id, str):
            raise ValueError("not a cursor this service made: no time zone, or no row id")
        if len(row_id) > 64 or "\x00" in row_id or not row_id.isprintable():
            raise ValueError("not a cursor this service made: a row id that cannot exist")
        return at, row_id
    except Exception as e:
        raise ValueError("cursor is not valid; pass the next_cursor value of a previous page") from e


def newest_first_page(
    session: Session, query: Select[Owned], model: type[Owned], *, limit: int, cursor: str | None
) -> tuple[list[Owned], str | None]:
    """One page of `query`, newest first, after `cursor` (a previous page's next_cursor); returns the rows
    and the next page's cursor (None on the last page). Raises ValueError for a cursor it did not make."""
    if cursor:
        created, row_id = decode_cursor(cursor)
        query = query.where(
            or_(model.created_at < created, and_(model.created_at == created, model.id < row_id))
        )
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    return rows[:limit], encode_cursor(rows[limit - 1]) if len(rows) > limit else None
