"""Predictions: run in this process by the PredictionRunner, polled, waited for
(`Prefer: wait`), streamed as server-sent events, canceled."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from tunery.server import sse
from tunery.server.deps import BaseUrl, Owner, PagingDep, PathModel, RunnerDep, StoreDep
from tunery.server.errors import ApiError, invalid, not_found
from tunery.server.runner import PredictionRunner, sampling_params
from tunery.server.schemas import PredictionCreate
from tunery.store.models import TERMINAL, Model, Version
from tunery.store.objects import prediction_json
from tunery.store.store import Store

router = APIRouter(tags=["predictions"])

RETRY_AFTER = 1  # seconds, in a 429's Retry-After
MAX_WAIT = 60  # seconds; also the official client's read timeout for `Prefer: wait`
_WAIT = re.compile(r"(?:^|[,;\s])wait(?:\s*=\s*(\d+))?", re.IGNORECASE)

PreferHeader = Annotated[
    str | None, Header(alias="Prefer", description="'wait' or 'wait=N' (seconds, <= 60).")
]


@router.post("/v1/predictions", status_code=201)
def create_prediction(
    body: PredictionCreate,
    owner: Owner,
    store: StoreDep,
    runner: RunnerDep,
    base: BaseUrl,
    prefer: PreferHeader = None,
) -> dict[str, Any]:
    """Run `body.version` ("<id>", "owner/name:<id>" or "owner/name" for the latest version)."""
    model, version = _version(store, owner, body.version)
    return _start(store, runner, owner, model, version, body, prefer, base)


@router.post("/v1/models/{model_owner}/{model_name}/predictions", status_code=201)
def create_model_prediction(
    body: PredictionCreate,
    model: PathModel,
    owner: Owner,
    store: StoreDep,
    runner: RunnerDep,
    base: BaseUrl,
    prefer: PreferHeader = None,
) -> dict[str, Any]:
    """Run the model's latest version."""
    version = store.latest_version(model.id)
    if version is None:
        raise invalid(f"model {model.owner}/{model.name} has no version yet: train it first")
    return _start(store, runner, owner, model, version, body, prefer, base)


@router.get("/v1/predictions")
def list_predictions(owner: Owner, store: StoreDep, paging: PagingDep, base: BaseUrl) -> dict[str, Any]:
    page = store.list_predictions(owner, cursor=paging.cursor, limit=paging.limit)
    return paging.render(page, lambda row: prediction_json(row, base))


@router.get("/v1/predictions/{prediction_id}")
def get_prediction(prediction_id: str, owner: Owner, store: StoreDep, base: BaseUrl) -> dict[str, Any]:
    row = store.get_prediction(owner, prediction_id)
    if row is None:
        raise not_found(f"prediction {prediction_id}")
    return prediction_json(row, base)


@router.post("/v1/predictions/{prediction_id}/cancel")
def cancel_prediction(
    prediction_id: str, owner: Owner, store: StoreDep, runner: RunnerDep, base: BaseUrl
) -> dict[str, Any]:
    """Cancel: a queued prediction ends at once, a running one within a token."""
    row = store.cancel_prediction(owner, prediction_id)
    if row is None:
        raise not_found(f"prediction {prediction_id}")
    runner.cancel(prediction_id)
    return prediction_json(row, base)


@router.get("/v1/predictions/{prediction_id}/stream")
def stream_prediction(
    prediction_id: str, owner: Owner, store: StoreDep, runner: RunnerDep
) -> StreamingResponse:
    """The output as server-sent events: what was produced so far, then live until done."""
    row = store.get_prediction(owner, prediction_id)
    if row is None:
        raise not_found(f"prediction {prediction_id}")
    return StreamingResponse(
        sse.stream(row, runner.channel(prediction_id)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def _version(store: Store, owner: str, ref: str | None) -> tuple[Model, Version]:
    """The (model, version) a prediction's `version` names, if the caller may run it; else 422."""
    if not ref:
        raise invalid(
            "version: required ('<id>' or 'owner/name:<id>')", [{"field": "version", "reason": "required"}]
        )
    if ":" in ref:
        name, _, version_id = ref.rpartition(":")
    else:
        name, version_id = (ref, "") if "/" in ref else ("", ref)
    found: tuple[Model, Version] | None = None
    if name:
        model_owner, _, model_name = name.partition("/")
        model = store.get_model(owner, model_owner, model_name)
        version = None
        if model is not None:
            version = (
                store.get_version(model.id, version_id) if version_id else store.latest_version(model.id)
            )
        found = (model, version) if model is not None and version is not None else None
    else:
        found = store.find_version(owner, version_id)
    if found is None:
        raise invalid(
            f"version {ref!r} does not exist or is not yours to run",
            [{"field": "version", "reason": "not found"}],
            title="Invalid version",
        )
    return found


def _start(
    store: Store,
    runner: PredictionRunner,
    owner: str,
    model: Model,
    version: Version,
    body: PredictionCreate,
    prefer: str | None,
    base: str,
) -> dict[str, Any]:
    """Create and queue the prediction; with `Prefer: wait`, block until it ends or the wait
    runs out. A prediction that has not ended is answered as "starting" with no output yet:
    the official client polls on "starting" but takes any other status of a waited request
    as final (and would return None)."""
    try:
        sampling_params(body.input)
    except (TypeError, ValueError) as exc:
        raise invalid(
            f"input: {exc}", [{"field": "input", "reason": str(exc)}], title="Invalid input"
        ) from None
    if not runner.reserve():
        raise ApiError(
            429,
            f"Request was throttled: this server already holds {runner.capacity} predictions (its "
            "engine's batch and queue). Expected available in 1 second.",
            title="Request was throttled",
            headers={"Retry-After": str(RETRY_AFTER)},
        )
    try:
        row = store.create_prediction(
            owner,
            model=f"{model.owner}/{model.name}",
            version_id=version.id,
            input=body.input,
            stream=body.stream,
            webhook=body.webhook,
            webhook_events_filter=body.webhook_events_filter,
            runner=runner.runner_id,
            lease_seconds=runner.lease_seconds,
        )
    except BaseException:
        runner.unreserve()
        raise
    channel = runner.submit(row.id, base=version.base_name, weights=version.run_url, inputs=body.input,
                            reserved=True)
    wait = _wait_seconds(prefer)
    if wait:
        # Answer a little before the client's own read timeout (the wait + 0.5 s) runs out.
        channel.finished.wait(max(0.0, wait - 1.0))
        row = store.get_prediction(owner, row.id) or row
    answer = prediction_json(row, base)
    if answer["status"] not in TERMINAL:
        answer.update(status="starting", output=None)
    return answer


def _wait_seconds(prefer: str | None) -> int:
    """Seconds to wait from a `Prefer` header: 'wait' is 60, 'wait=N' is N (at most 60), none is 0."""
    match = _WAIT.search(prefer or "")
    if match is None:
        return 0
    return min(MAX_WAIT, int(match.group(1))) if match.group(1) else MAX_WAIT
