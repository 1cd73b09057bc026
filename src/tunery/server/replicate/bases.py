"""Operators' own base models (admin only): register, list, remove. A registered base is then an
ordinary public model "tunery/<name>" in /v1/models, trained and predicted like the built-in ones."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from tunery.errors import TuneryError
from tunery.server.deps import AdminOwner, PagingDep, SettingsDep, StoreDep
from tunery.server.errors import ApiError, invalid, not_found
from tunery.server.replicate.schemas import BaseCreate
from tunery.service.bases import base_record, register_base
from tunery.store.store import BASE_OWNER, Conflict

router = APIRouter(prefix="/v1/bases", tags=["bases"])


@router.post("", status_code=201)
def create_base(body: BaseCreate, admin: AdminOwner, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    """Register a base from a directory or .gguf file on the server, a Hugging Face id in its cache,
    or a storage URL. The first registration of a GGUF or URL converts or downloads it, and of a
    directory reads every weight file once for its content hash: this request can take minutes."""
    try:
        return register_base(store, settings, name=body.name, source=body.source, description=body.description,
                             registered_by=f"owner:{admin}")
    except Conflict as exc:
        raise ApiError(409, str(exc), title="Conflict") from None
    except TuneryError as exc:
        raise invalid(str(exc), [{"field": "source", "reason": str(exc)}], title="Base model unavailable") from None


@router.get("")
def list_bases(_admin: AdminOwner, store: StoreDep, paging: PagingDep) -> dict[str, Any]:
    """The registered bases (not the built-in ones), newest first, with their sources."""
    page = store.list_bases(cursor=paging.cursor, limit=paging.limit)
    return paging.render(page, lambda m: base_record(m, store.latest_version(m.id)))


@router.delete("/{name}", status_code=204)
def delete_base(name: str, _admin: AdminOwner, store: StoreDep) -> Response:
    """Remove a registered base: it leaves /v1/models; versions trained on it keep working."""
    if not store.remove_base(name):
        raise not_found(f"registered base {BASE_OWNER}/{name} (built-in bases can not be removed)")
    return Response(status_code=204)
