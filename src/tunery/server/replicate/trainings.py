"""Trainings: created on a base model's version (checked completely before anything is
queued), run by the workers, pushed as a new version of the destination model."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from tunery.artifacts import ARCHIVE
from tunery.server.deps import (
    BaseUrl,
    ExportsDep,
    Owner,
    OwnHosts,
    PagingDep,
    PathModel,
    PathVersion,
    SettingsDep,
    StoreDep,
)
from tunery.server.download import download
from tunery.server.errors import ApiError, not_found
from tunery.server.replicate.schemas import ExportCreate, TrainingCreate
from tunery.server.replicate.shapes import export_json, training_json
from tunery.service import exports, trainings

router = APIRouter(tags=["trainings"])


@router.post("/v1/models/{model_owner}/{model_name}/versions/{version_id}/trainings", status_code=201)
def create_training(
    body: TrainingCreate,
    owner: Owner,
    model: PathModel,
    version: PathVersion,
    store: StoreDep,
    settings: SettingsDep,
    base: BaseUrl,
    hosts: OwnHosts,
) -> dict[str, Any]:
    """Queue a training of this base version; every input and every line of the data is checked
    first, and a bad request leaves nothing behind."""
    row = trainings.create_training(
        store, settings, owner=owner, base=model, version=version, destination=body.destination, inputs=body.input,
        own_hosts=hosts, webhook=body.webhook, webhook_events_filter=body.webhook_events_filter,
        hardware=body.hardware)
    return training_json(row, base)


@router.get("/v1/trainings")
def list_trainings(
    owner: Owner,
    store: StoreDep,
    paging: PagingDep,
    base: BaseUrl,
    view: Annotated[Literal["full", "summary"], Query(
        description="full: each training as GET /v1/trainings/{id} answers it; summary: without logs, "
        "samples, data statistics and all but the last 20 metric history points (for pages that poll)."
    )] = "full",
) -> dict[str, Any]:
    page = store.list_trainings(owner, cursor=paging.cursor, limit=paging.limit)
    return paging.render(page, lambda row: training_json(row, base, summary=view == "summary"))


@router.get("/v1/trainings/{training_id}")
def get_training(training_id: str, owner: Owner, store: StoreDep, base: BaseUrl) -> dict[str, Any]:
    row = store.get_training(owner, training_id)
    if row is None:
        raise not_found(f"training {training_id}")
    return training_json(row, base)


@router.post("/v1/trainings/{training_id}/cancel")
def cancel_training(training_id: str, owner: Owner, store: StoreDep, base: BaseUrl) -> dict[str, Any]:
    """Cancel: a queued training ends at once, a running one within seconds (its worker stops
    it); a finished one is returned unchanged."""
    row = store.cancel_training(owner, training_id)
    if row is None:
        raise not_found(f"training {training_id}")
    return training_json(row, base)


@router.get("/v1/trainings/{training_id}/weights")
def training_weights(training_id: str, owner: Owner, store: StoreDep, settings: SettingsDep) -> StreamingResponse:
    """The trained weights (training_output.zip: adapter or model, tokenizer, manifest), streamed
    from the run's storage."""
    row = store.get_training(owner, training_id)
    if row is None:
        raise not_found(f"training {training_id}")
    run = settings.run(row.run_url) if row.run_url else None
    if row.status != "succeeded" or run is None or not run.has_archive():
        raise ApiError(404, f"training {training_id} has no weights (status {row.status})", title="Not found")
    return download(run.open_archive(), filename=ARCHIVE, size=run.archive_size(), media_type="application/zip")


@router.post("/v1/trainings/{training_id}/exports", status_code=202)
def create_export(training_id: str, body: ExportCreate, owner: Owner, store: StoreDep, settings: SettingsDep,
                  made: ExportsDep, base: BaseUrl) -> dict[str, Any]:
    """Export a succeeded training (merged weights, GGUF, or GGUF + Ollama Modelfile) into its run's
    exports; answered at once with the export's state, downloadable when it has succeeded."""
    state = exports.start_export(store, settings, made, owner, training_id, body.format, dtype=body.dtype,
                                 quant=body.quant)
    return export_json(training_id, base, state)


@router.get("/v1/trainings/{training_id}/exports")
def list_training_exports(training_id: str, owner: Owner, store: StoreDep, settings: SettingsDep, made: ExportsDep,
                          base: BaseUrl) -> dict[str, Any]:
    """The training's exports: those in its run (succeeded) and those this server is making or failed."""
    found = exports.training_exports(store, settings, made, owner, training_id)
    return {"results": [export_json(training_id, base, entry) for entry in found]}


@router.get("/v1/trainings/{training_id}/exports/{name}")
def download_export(training_id: str, name: str, owner: Owner, store: StoreDep,
                    settings: SettingsDep) -> StreamingResponse:
    """An export's file: a .zip (merged, ollama) or a .gguf."""
    local = exports.export_file(store, settings, owner, training_id, name)
    kind = "application/zip" if local.suffix == ".zip" else "application/octet-stream"
    return download(open(local, "rb"), filename=local.name, size=local.stat().st_size, media_type=kind)
