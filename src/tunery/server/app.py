"""The FastAPI application: Replicate's /v1 API, OpenAI's under /openai/v1 and Azure's scoring, each
a thin layer over `tunery.service`; the prediction runner; and (optionally) training workers
running inside the server process.

Nothing heavy is imported here: the API starts in about a second and keeps answering while a
worker trains; torch is loaded by the prediction runner on the first prediction.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from tunery.server import azure, dashboard, errors, openai, replicate
from tunery.server.replicate.shapes import webhook_body
from tunery.service.exports import Exports
from tunery.service.limits import RequestRate
from tunery.service.prediction_runner import PredictionRunner
from tunery.settings import Settings, get_settings
from tunery.store.store import Store
from tunery.version import __version__

#: What a multipart body may carry beyond the file itself (boundaries, headers, small fields).
MULTIPART_SLACK = 64 * 1024
#: Where files are uploaded: Replicate's files, and OpenAI's.
UPLOADS = ("/v1/files", "/openai/v1/files")


def base_model_entries() -> list[tuple[str, str | None, str]]:
    """(name, description, base_name) of every registered base model, listed as tunery/<name>."""
    from tunery.models.registry import REGISTRY

    return [(entry.name, entry.description, entry.name) for entry in REGISTRY.values()]


def create_app(
    settings: Settings | None = None, *, store: Store | None = None, start_workers: bool | None = None
) -> FastAPI:
    """The API application. At startup it opens the store (`store`, or one on settings.db_url,
    migrated to the newest schema), registers the base models, starts the prediction runner and,
    unless `start_workers` is False, the webhook sender and settings.embedded_workers training
    workers (at least one when `start_workers` is True); at shutdown it stops them all. A store
    passed in is not closed."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = store is None
        the_store = store or Store(settings.db_url, base_url=_store_base_url(settings), webhook_body=webhook_body)
        if the_store.webhook_body is None:  # a store opened elsewhere: its webhooks are Replicate's objects
            the_store.webhook_body = webhook_body
        the_store.ensure_base_models(base_model_entries())
        # Predictions run in this process; those a server that died left unfinished (a previous
        # run of this one, or another on the same database) are taken over as their leases expire.
        runner = PredictionRunner(the_store, lease_seconds=settings.lease_seconds, settings=settings)
        runner.start()
        workers = _start_workers(the_store, settings, start_workers)
        app.state.store, app.state.runner = the_store, runner
        app.state.rate = RequestRate()  # each owner's requests in the last minute, on this server
        try:
            yield
        finally:
            if workers is not None:
                workers.stop()
            runner.stop()
            if own:
                the_store.close()

    app = FastAPI(
        title="tunery",
        version=__version__,
        description="Fine-tune Llama-family models and run them, through Replicate's HTTP API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.exports = Exports(settings)
    errors.install(app)
    openai.install(app)
    for router in [*replicate.ROUTERS, *openai.ROUTERS, *azure.ROUTERS]:
        app.include_router(router)
    dashboard.install(app)
    app.add_middleware(UploadLimit, limit=settings.max_upload_bytes + MULTIPART_SLACK)

    @app.get("/health", tags=["health"])
    def health() -> dict[str, Any]:
        """Unauthenticated liveness probe."""
        return {"status": "ok", "version": __version__}

    return app


def _store_base_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return (settings.public_url or f"http://{host}:{settings.port}").rstrip("/")


def _start_workers(store: Store, settings: Settings, start: bool | None) -> Any:
    """The embedded training workers plus the webhook sender, started; None when `start` is False.
    With settings.embedded_workers == 0 only the sender runs (trainings go to `tunery worker`s)."""
    if start is False:
        return None
    from tunery.worker.service import EmbeddedWorkers

    count = max(1, settings.embedded_workers) if start else max(0, settings.embedded_workers)
    return EmbeddedWorkers(store, settings, count=count).start()


class UploadLimit:
    """Refuse an upload (413) by its Content-Length before reading it, so an oversized body never
    reaches the disk. (A body without a length is counted while it is saved instead.)"""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") in UPLOADS:
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                response = errors.problem(
                    413,
                    f"file too large: the limit is {self.limit - MULTIPART_SLACK} bytes",
                    title="Payload too large",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
