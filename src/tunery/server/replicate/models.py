"""Models and their versions: base models (owner "tunery", public) and the callers' own
destination models, which trainings push new versions to."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from tunery.server.deps import (
    BaseUrl,
    Owner,
    PagingDep,
    PathModel,
    PathVersion,
    RunnerDep,
    SettingsDep,
    StoreDep,
)
from tunery.server.errors import ApiError, invalid
from tunery.server.replicate.schemas import ModelCreate
from tunery.server.replicate.shapes import model_json, version_json
from tunery.service import models
from tunery.store.store import Conflict

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post("", status_code=201)
def create_model(body: ModelCreate, owner: Owner, store: StoreDep, base: BaseUrl) -> dict[str, Any]:
    """Create an empty model under the caller's own name (409 if it exists)."""
    if body.owner != owner:
        raise invalid(
            f"owner {body.owner!r}: you can only create models under your own name {owner!r}",
            [{"field": "owner", "reason": f"must be {owner!r}"}],
        )
    try:
        model = store.create_model(
            owner, body.name, description=body.description, visibility=body.visibility, hardware=body.hardware
        )
    except Conflict as exc:
        raise ApiError(409, str(exc), title="Conflict") from None
    return model_json(model, None, base)


@router.get("")
def list_models(owner: Owner, store: StoreDep, paging: PagingDep, base: BaseUrl) -> dict[str, Any]:
    """The models the caller can see: its own and the public (base) ones, newest first."""
    page = store.list_models(owner, cursor=paging.cursor, limit=paging.limit)
    return paging.render(page, lambda m: model_json(m, store.latest_version(m.id), base))


@router.get("/{model_owner}/{model_name}")
def get_model(model: PathModel, store: StoreDep, base: BaseUrl) -> dict[str, Any]:
    return model_json(model, store.latest_version(model.id), base)


@router.get("/{model_owner}/{model_name}/versions")
def list_versions(model: PathModel, store: StoreDep, paging: PagingDep) -> dict[str, Any]:
    page = store.list_versions(model.id, cursor=paging.cursor, limit=paging.limit)
    return paging.render(page, version_json)


@router.get("/{model_owner}/{model_name}/versions/{version_id}")
def get_version(version: PathVersion) -> dict[str, Any]:
    return version_json(version)


@router.delete("/{model_owner}/{model_name}", status_code=204)
def delete_model(model: PathModel, owner: Owner, store: StoreDep, settings: SettingsDep,
                 runner: RunnerDep) -> Response:
    """Delete one of your models, with its versions, their predictions and their weights (in
    storage and on the serving engines). Unlike Replicate, which asks for the versions to be
    deleted first, the versions go with it; refused (409) while a training writes to it."""
    models.delete_model(store, settings, runner, owner, model)
    return Response(status_code=204)


@router.delete("/{model_owner}/{model_name}/versions/{version_id}", status_code=204)
def delete_version(model: PathModel, version: PathVersion, owner: Owner, store: StoreDep, settings: SettingsDep,
                   runner: RunnerDep) -> Response:
    """Delete a version of one of your models, with its predictions and its weights; refused (409)
    while a training writes to the model or trains from the version, or when other owners ran it.
    204, which the official client reads as done (Replicate's schema says 202)."""
    models.delete_version(store, settings, runner, owner, model, version)
    return Response(status_code=204)
