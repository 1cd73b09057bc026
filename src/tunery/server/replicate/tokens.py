"""Operators' token routes (admin scope, an owner in TUNERY_ADMIN_OWNERS): list, create, revoke.
A token is shown once, in the answer that creates it; listings show its first characters."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from tunery.server.deps import AdminOwner, StoreDep
from tunery.service import tokens

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


class TokenCreate(BaseModel):
    owner: str = Field(min_length=1, max_length=100, description="Who the token acts as (created if new).")
    label: str | None = Field(None, max_length=200, description="A note to tell tokens apart.")
    scopes: list[str] | None = Field(None, description="Of read, predict, train, admin (default: all).")
    expires: str | None = Field(None, description="A duration (90m, 12h, 30d, 2w) or a date or time; none: "
                                                  "until revoked.")


@router.get("")
def list_tokens(_admin: AdminOwner, store: StoreDep,
                owner: Annotated[str | None, Query(description="Only this owner's tokens.")] = None) -> dict[str, Any]:
    """Every token (or one owner's), oldest first, with its status: active, expired or revoked."""
    return {"results": [tokens.record(row) for row in store.list_tokens(owner)]}


@router.post("", status_code=201)
def create_token(body: TokenCreate, _admin: AdminOwner, store: StoreDep) -> dict[str, Any]:
    """A new token; the answer is the only place it is ever shown."""
    token, row = tokens.create(store, body.owner, label=body.label, scopes=body.scopes, expires=body.expires)
    return tokens.record(row) | {"token": token}


@router.delete("/{token_id}")
def revoke_token(token_id: int, _admin: AdminOwner, store: StoreDep) -> dict[str, Any]:
    """Revoke a token: every API refuses it from the next request on."""
    return tokens.record(tokens.revoke(store, token_id))
