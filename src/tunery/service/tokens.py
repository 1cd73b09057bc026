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
    naming the field, for anything else or a time not in the future."""
    now = now or utcnow()
    match = _DURATION.match(text)
    if match:
        when = now + timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    else:
        try:
            when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise Invalid(f"expires: {text!r} is neither a duration (90m, 12h, 30d, 2w) nor a date or time "
                          "(2027-01-31, 2027-01-31T18:00:00Z)", field="expires") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=now.tzinfo)
    if when <= now:
        raise Invalid(f"expires: {text!r} is not in the future", field="expires")
    return when


def parse_scopes(scopes: list[str] | str | None) -> list[str]:
    """Scopes from a list or a comma-separated string (None: all of them)."""
    if scopes is None:
        return list(SCOPES)
    items = scopes.split(",") if isinstance(scopes, str) else [p for s in scopes for p in s.split(",")]
    chosen = [s.strip() for s in items if s.strip()]
    unknown = sorted(set(chosen) - set(SCOPES))
    if unknown or not chosen:
        raise Invalid(f"scopes: {', '.join(unknown) or 'none given'}; choose from {', '.join(SCOPES)}",
                      field="scopes")
    return chosen


def create(store: Store, owner: str, *, label: str | None = None, scopes: list[str] | str | None = None,
           expires: str | None = None) -> tuple[str, ApiToken]:
    """A new token for `owner` and its listing row."""
    token = store.create_token(owner, label, scopes=parse_scopes(scopes),
                               expires_at=parse_expiry(expires) if expires else None)
    row = next(r for r in reversed(store.list_tokens(owner)) if r.prefix == token[:10])
    return token, row


def revoke(store: Store, token_id: int, owner: str | None = None) -> ApiToken:
    row = store.revoke_token(token_id, owner)
    if row is None:
        raise NotFound(f"token {token_id} not found", field="id")
    return row


def status(row: ApiToken, now: datetime | None = None) -> str:
    now = now or utcnow()
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


def record(row: ApiToken) -> dict[str, Any]:
    """A token as listings show it: never the token itself."""
    def iso(when: datetime | None) -> str | None:
        return when.isoformat(timespec="seconds").replace("+00:00", "Z") if when else None

    return {"id": row.id, "owner": row.owner, "label": row.label, "prefix": row.prefix,
            "scopes": sorted(row.scope_set, key=SCOPES.index), "status": status(row),
            "created_at": iso(row.created_at), "expires_at": iso(row.expires_at), "revoked_at": iso(row.revoked_at)}
