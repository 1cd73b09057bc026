"""The caller's account, the webhook signing secret, and the hardware the running workers offer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from tunery.server.deps import Owner, SettingsDep, StoreDep
from tunery.service import hardware

router = APIRouter(tags=["account"])


@router.get("/v1/account")
def get_account(owner: Owner) -> dict[str, Any]:
    """Who the token belongs to (what `replicate.accounts.current()` reads)."""
    return {"type": "user", "username": owner, "name": owner, "github_url": None}


@router.get("/v1/webhooks/default/secret")
def webhook_secret(owner: Owner, store: StoreDep) -> dict[str, str]:
    """The key webhooks are signed with, for `replicate.webhooks.validate`."""
    return {"key": store.webhook_secret()}


@router.get("/v1/hardware")
def list_hardware(owner: Owner, store: StoreDep, settings: SettingsDep) -> list[dict[str, Any]]:
    """What the running workers offer, as Replicate lists hardware (`[{"name", "sku"}]`, what
    `replicate.hardware.list()` reads), with how many workers offer each and their labels. A
    model's or training's `hardware` names one of these SKUs, or labels (`gpu=a100,mem=80g`)."""
    return hardware.offered(store, settings)
