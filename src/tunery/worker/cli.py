"""Commands of the worker side, as plain functions with typer annotations; the `tunery` CLI
registers them (`tunery worker`, `tunery tokens create`)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from tunery.settings import get_settings


def _public_url(settings) -> str:
    return (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")


def worker_command(
    database_url: Annotated[str | None, typer.Option(
        "--database-url", help="Database to take trainings from (default: TUNERY_DATABASE_URL, else the "
        "SQLite file under TUNERY_HOME).")] = None,
    worker_id: Annotated[str | None, typer.Option(
        "--worker-id", help="Name of this worker in leases and logs (default: host-pid-random).")] = None,
    gpus: Annotated[str | None, typer.Option(
        "--gpus", help="CUDA devices this worker's trainings get, e.g. 0,1 (default: TUNERY_GPUS, else all "
        "it sees). With several, a training runs one process per device under accelerate.")] = None,
    processes: Annotated[int | None, typer.Option(
        "--processes", min=1, help="Processes per training (default: one per GPU in --gpus, else 1; on a CPU, "
        "several run over gloo).")] = None,
) -> None:
    """Run a training worker (and a webhook sender) until Ctrl-C or SIGTERM.

    A training running at that moment is stopped and handed back, to be resumed from its last
    checkpoint by the next worker that claims it.
    """
    from tunery.artifacts import check_storage
    from tunery.errors import TuneryError
    from tunery.store.store import Store
    from tunery.worker.service import run_worker

    settings = get_settings()
    overrides = {"gpus": gpus, "train_processes": processes}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    try:  # a storage that cannot be written stops the worker here, not each training later
        check_storage(settings.storage, settings.storage_options)
    except TuneryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    store = Store(database_url or settings.db_url, base_url=_public_url(settings))
    try:
        run_worker(store, settings, worker_id=worker_id)
    finally:
        store.close()


def tokens_create(
    owner: Annotated[str, typer.Option("--owner", help="Who the token acts as (created if new).")],
    label: Annotated[str | None, typer.Option("--label", help="A note to tell tokens apart.")] = None,
) -> None:
    """Create an API token and print it. Only its hash is stored: keep the printed token."""
    from tunery.store.store import Store

    settings = get_settings()
    store = Store(settings.db_url, base_url=_public_url(settings))
    try:
        typer.echo(store.create_token(owner, label))
    finally:
        store.close()
