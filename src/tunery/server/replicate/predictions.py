"""Predictions: run in this process by the PredictionRunner, polled, waited for
(`Prefer: wait`), streamed as server-sent events, canceled."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from tunery.server.deps import BaseUrl, Owner, PagingDep, PathModel, RunnerDep, StoreDep
from tunery.server.errors import invalid, not_found
from tunery.server.replicate import sse
from tunery.server.replicate.schemas import PredictionCreate
from tunery.server.replicate.shapes import prediction_json
from tunery.service import predictions
from tunery.service.errors import NotFound
from tunery.service.prediction_runner import PredictionRunner
from tunery.store.models import TERMINAL, Model, Prediction, Version
from tunery.store.store import Store

router = APIRouter(tags=["predictions"])

MAX_WAIT = 60  # seconds; also the official client's read timeout for `Prefer: wait`
_WAIT = re.compile(r"(?:^|[,;\s])wait(?:\s*=\s*(\d+))?", re.IGNORECASE)

PreferHeader = Annotated[
    str | None, Header(alias="Prefer", description="'wait' or 'wait=N' (seconds, <= 60).")
]


@router.post("/v1/predictions", status_code=201)
async def create_prediction(
    body: PredictionCreate,
    owner: Owner,
    store: StoreDep,
    runner: RunnerDep,
    base: BaseUrl,
    prefer: PreferHeader = None,
) -> dict[str, Any]:
    """Run `body.version` ("<id>", "owner/name:<id>" or "owner/name" for the latest version)."""
    model, version = await run_in_threadpool(predictions.find_version, store, owner, body.version)
    return await _start(store, runner, owner, model, version, body, prefer, base)


@router.post("/v1/models/{model_owner}/{model_name}/predictions", status_code=201)
async def create_model_prediction(
    body: PredictionCreate,
    model: PathModel,
    owner: Owner,
    store: StoreDep,
    runner: RunnerDep,
    base: BaseUrl,
    prefer: PreferHeader = None,
) -> dict[str, Any]:
    """Run the model's latest version."""
    try:
        version = await run_in_threadpool(predictions.latest_version, store, model)
    except NotFound as exc:
        raise invalid(exc.message) from None
    return await _start(store, runner, owner, model, version, body, prefer, base)


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


async def _start(
    store: Store,
    runner: PredictionRunner,
    owner: str,
    model: Model,
    version: Version,
    body: PredictionCreate,
    prefer: str | None,
    base: str,
) -> dict[str, Any]:
    """Create and queue the prediction; with `Prefer: wait`, wait until it ends or the wait
    runs out. A prediction that has not ended is answered as "starting" with no output yet:
    the official client polls on "starting" but takes any other status of a waited request
    as final (and would return None)."""
    row, channel = await run_in_threadpool(
        predictions.create_prediction, store, runner, owner=owner, model=model, version=version, input=body.input,
        stream=body.stream, webhook=body.webhook, webhook_events_filter=body.webhook_events_filter)
    wait = _wait_seconds(prefer)
    if wait:
        # Answer a little before the client's own read timeout (the wait + 0.5 s) runs out; the
        # wait is on the event loop, so waiting requests hold no thread.
        await sse.wait_done(channel, max(0.0, wait - 1.0))
        found: Prediction | None = await run_in_threadpool(store.get_prediction, owner, row.id)
        row = found or row
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
