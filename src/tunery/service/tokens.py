"""API tokens for the CLI and the operators' routes alike: when one expires, what a listing shows
(never the token: its first characters, owner, label, scopes and dates), creating and revoking."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from tunery.service.errors import Invalid, NotFound
from tunery.store.models import SCOPES, ApiToken, utcnow
from tunery.store.store import Store

_DURATION = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """When a token given `--expires TEXT` expires: a duration from now (`90m`, `12h`, `30d`,
    `2w`) or a date or time (`2027-01-31`, `2027-01-31T18:00:00Z`; UTC unless it says). Invalid,
    naming the field, for anything else (the store refuses a time not in the future)."""
    now = now or utcnow()
    match = _DURATION.match(text)
    if match:
        return now + timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise Invalid(f"expires: {text!r} is neither a duration (90m, 12h, 30d, 2w) nor a date or time "
                      "(2027-01-31, 2027-01-31T18:00:00Z)", field="expires") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=now.tzinfo)


def create(store: Store, owner: str, *, label: str | None = None, scopes: list[str] | str | None = None,
           expires: str | None = None) -> tuple[str, ApiToken]:
    """A new token for `owner` and its listing row. `scopes`: a list, or comma-separated (each
    list item may be too); None gives every scope. The store checks them and the expiry."""
    given: dict[str, Any] = {}
    if scopes is not None:
        items = [scopes] if isinstance(scopes, str) else scopes
        given["scopes"] = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if expires:
        given["expires_at"] = parse_expiry(expires)
    try:
        token = store.create_token(owner, label, **given)
    except ValueError as exc:  # unknown scopes, none, or an expiry not in the future
        raise Invalid(str(exc), field=str(exc).partition(":")[0]) from None
    row = next(r for r in reversed(store.list_tokens(owner)) if r.prefix == token[:10])
    return token, row


def revoke(store: Store, token_id: int, owner: str | None = None) -> ApiToken:
    row = store.revoke_token(token_id, owner)
    if row is None:
        raise NotFound(f"token {token_id} not found", field="id")
    return row


def record(row: ApiToken) -> dict[str, Any]:
    """A token as listings show it: never the token itself."""
    def iso(when: datetime | None) -> str | None:
        return when.isoformat(timespec="seconds").replace("+00:00", "Z") if when else None

    return {"id": row.id, "owner": row.owner, "label": row.label, "prefix": row.prefix,
            "scopes": sorted(row.scope_set, key=SCOPES.index), "status": row.status(),
            "created_at": iso(row.created_at), "expires_at": iso(row.expires_at), "revoked_at": iso(row.revoked_at)}
