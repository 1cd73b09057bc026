"""Trainings: created on a base model's version (checked completely before anything is
queued), run by the workers, pushed as a new version of the destination model."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from tunery.artifacts import ARCHIVE
from tunery.server.deps import (
    BaseUrl,
    Owner,
    OwnHosts,
    PagingDep,
    PathModel,
    PathVersion,
    SettingsDep,
    StoreDep,
)
from tunery.server.errors import ApiError, not_found
from tunery.server.schemas import TrainingCreate
from tunery.server.training_request import prepare_job
from tunery.store.objects import training_json

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
    job = prepare_job(store, settings, owner=owner, base=model, version=version, body=body, own_hosts=hosts)
    row = store.create_training(
        owner,
        model=f"{model.owner}/{model.name}",
        version_id=version.id,
        destination=body.destination,
        input=body.input,
        job=job.model_dump(),
        webhook=body.webhook,
        webhook_events_filter=body.webhook_events_filter,
    )
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
    size = run.archive_size()
    stream = run.open_archive()

    def chunks():
        with stream:
            while chunk := stream.read(1024 * 1024):
                yield chunk

    return StreamingResponse(chunks(), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{ARCHIVE}"', "Content-Length": str(size)})
