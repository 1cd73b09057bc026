"""Trainings: created on a base model's version (checked completely before anything is
queued), run by the workers, pushed as a new version of the destination model."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
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
from tunery.server.download import download
from tunery.server.errors import ApiError, not_found
from tunery.server.schemas import ExportCreate, TrainingCreate
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
    return download(run.open_archive(), filename=ARCHIVE, size=run.archive_size(), media_type="application/zip")


def _exported_run(store, settings, owner: str, training_id: str):
    row = store.get_training(owner, training_id)
    if row is None:
        raise not_found(f"training {training_id}")
    if row.status != "succeeded" or not row.run_url:
        raise ApiError(409, f"training {training_id} is {row.status}: only a succeeded training can be exported",
                       title="Conflict")
    return row, settings.run(row.run_url)


def _export_json(training_id: str, base: str, entry: dict[str, Any]) -> dict[str, Any]:
    from tunery.export.exporter import file_name

    out = {"name": entry["name"], "format": entry["format"], "status": entry.get("status", "succeeded"),
           "error": entry.get("error"), "file": file_name(entry["name"]),
           "urls": {"download": f"{base}/v1/trainings/{training_id}/exports/{entry['name']}"}}
    for key in ("check", "max_abs_diff", "relative_diff", "tolerance", "argmax_agreement", "ollama_create",
                "dtype", "quant"):
        if key in entry:
            out[key] = entry[key]
    return out


@router.post("/v1/trainings/{training_id}/exports", status_code=202)
def create_export(training_id: str, body: ExportCreate, request: Request, owner: Owner, store: StoreDep,
                  settings: SettingsDep, base: BaseUrl) -> dict[str, Any]:
    """Export a succeeded training (merged weights, GGUF, or GGUF + Ollama Modelfile) into its run's
    exports; answered at once with the export's state, downloadable when it has succeeded."""
    from tunery.errors import TuneryError
    from tunery.export.exporter import export_name, list_exports

    try:
        name = export_name(body.format, dtype=body.dtype, quant=body.quant)
    except TuneryError as e:
        raise ApiError(422, str(e), title="Invalid export", errors=[{"field": "format", "reason": str(e)}]) from None
    row, run = _exported_run(store, settings, owner, training_id)
    done = {e["name"]: e for e in list_exports(run)}
    if name in done:
        return _export_json(training_id, base, {**done[name], "status": "succeeded"})
    state = request.app.state.exports.start(training_id, row.run_url, body.format, dtype=body.dtype, quant=body.quant)
    return _export_json(training_id, base, state)


@router.get("/v1/trainings/{training_id}/exports")
def list_training_exports(training_id: str, request: Request, owner: Owner, store: StoreDep, settings: SettingsDep,
                          base: BaseUrl) -> dict[str, Any]:
    """The training's exports: those in its run (succeeded) and those this server is making or failed."""
    from tunery.export.exporter import list_exports

    row = store.get_training(owner, training_id)
    if row is None:
        raise not_found(f"training {training_id}")
    states = request.app.state.exports.states(training_id)
    done = {e["name"]: {**e, "status": "succeeded"} for e in list_exports(settings.run(row.run_url))} \
        if row.run_url and row.status == "succeeded" else {}
    merged = {**states, **done}
    return {"results": [_export_json(training_id, base, merged[name]) for name in sorted(merged)]}


@router.get("/v1/trainings/{training_id}/exports/{name}")
def download_export(training_id: str, name: str, owner: Owner, store: StoreDep,
                    settings: SettingsDep) -> StreamingResponse:
    """An export's file: a .zip (merged, ollama) or a .gguf."""
    from tunery.export.exporter import file_name, list_exports

    _, run = _exported_run(store, settings, owner, training_id)
    if name not in {e["name"] for e in list_exports(run)}:
        raise not_found(f"export {name} of training {training_id}")
    local = run.pull(run.export_entry(file_name(name)))
    kind = "application/zip" if local.suffix == ".zip" else "application/octet-stream"
    return download(open(local, "rb"), filename=local.name, size=local.stat().st_size, media_type=kind)
