"""Keyset pagination, newest first, with opaque cursors.

A cursor encodes a direction and the (created_at, id) of the row the page starts after, so a
page is one indexed range query however deep the client walks, and rows inserted meanwhile
neither repeat nor shift what later pages hold.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session


@dataclass
class Page:
    """One page of a list: `items` newest first, and the cursors of its neighbours (None at the ends)."""

    items: list
    next_cursor: str | None
    previous_cursor: str | None


class BadCursor(ValueError):
    """The cursor was not made by this store (the API answers 400)."""


def encode_cursor(direction: str, created_at: datetime, row_id: Any) -> str:
    raw = json.dumps([direction, created_at.isoformat(), row_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, datetime, Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        direction, created, row_id = json.loads(raw)
        if direction not in ("n", "p"):
            raise ValueError(direction)
        created_at = datetime.fromisoformat(created)
        if created_at.tzinfo is None:
            raise ValueError("naive time")
        return direction, created_at, row_id
    except (ValueError, TypeError) as exc:
        raise BadCursor(f"invalid cursor: {cursor!r}") from exc


def paginate(
    session: Session,
    stmt: Select,
    created: InstrumentedAttribute,
    key: InstrumentedAttribute,
    cursor: str | None,
    limit: int,
) -> Page:
    """Run `stmt` (a select of one entity) as the page that `cursor` names, newest first.

    `next_cursor` is set when older rows exist; `previous_cursor` when newer rows exist.
    """
    limit = max(1, int(limit))
    if cursor is None:
        rows = list(session.scalars(stmt.order_by(created.desc(), key.desc()).limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(rows, _cursor("n", rows[-1], created, key) if more else None, None)

    direction, at, row_id = decode_cursor(cursor)
    if direction == "n":
        older = or_(created < at, and_(created == at, key < row_id))
        rows = list(session.scalars(stmt.where(older).order_by(created.desc(), key.desc()).limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = _cursor("n", rows[-1], created, key) if more else None
        # The row the cursor points at is newer than this page, so a previous page exists.
        previous_cursor = _cursor("p", rows[0], created, key) if rows else None
        return Page(rows, next_cursor, previous_cursor)

    newer = or_(created > at, and_(created == at, key > row_id))
    rows = list(session.scalars(stmt.where(newer).order_by(created.asc(), key.asc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit][::-1]
    previous_cursor = _cursor("p", rows[0], created, key) if more else None
    next_cursor = _cursor("n", rows[-1], created, key) if rows else None
    return Page(rows, next_cursor, previous_cursor)


def _cursor(direction: str, row: Any, created: InstrumentedAttribute, key: InstrumentedAttribute) -> str:
    return encode_cursor(direction, getattr(row, created.key), getattr(row, key.key))
