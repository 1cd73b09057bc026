"""The caller's account and the webhook signing secret."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from tunery.server.deps import Owner, StoreDep

router = APIRouter(tags=["account"])


@router.get("/v1/account")
def get_account(owner: Owner) -> dict[str, Any]:
    """Who the token belongs to (what `replicate.accounts.current()` reads)."""
    return {"type": "user", "username": owner, "name": owner, "github_url": None}


@router.get("/v1/webhooks/default/secret")
def webhook_secret(owner: Owner, store: StoreDep) -> dict[str, str]:
    """The key webhooks are signed with, for `replicate.webhooks.validate`."""
    return {"key": store.webhook_secret()}
