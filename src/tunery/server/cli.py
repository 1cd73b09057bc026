"""The service's commands, for `tunery` to register: `serve_command` (tunery serve),
`worker_command` (tunery worker), `tokens_app` (tunery tokens), `owners_app` (tunery owners) and
`bases_app` (tunery bases): each opens the store with Replicate's webhook bodies."""

from __future__ import annotations

import logging
from typing import Annotated, Any, NoReturn

import typer

from tunery.errors import TuneryError
from tunery.settings import get_settings


def _fail(exc: Exception) -> NoReturn:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


def open_store(url: str | None = None):
    """The configured store (or the one at `url`), writing Replicate's objects as webhook bodies."""
    from tunery.server.replicate.shapes import webhook_body
    from tunery.store.store import Store

    settings = get_settings()
    return Store(url or settings.db_url, base_url=_public_url(settings), webhook_body=webhook_body)


def _public_url(settings) -> str:
    return (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")


def serve_command(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 8000).")] = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="SQLAlchemy URL (default: a SQLite file in the data directory)."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Training workers to run inside the server (default 1; 0: none, run `tunery worker`)."
        ),
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(help="CUDA devices for the embedded workers' trainings, e.g. 0,1,2,3 (split between the "
                     "workers: with --workers 2, 0,1 and 2,3)."),
    ] = None,
) -> None:
    """Serve Replicate's HTTP API (trainings, predictions, models, files) until interrupted."""
    import uvicorn

    from tunery.server.app import create_app
    from tunery.settings import get_settings

    overrides: dict[str, Any] = {
        "host": host,
        "port": port,
        "database_url": database_url,
        "embedded_workers": workers,
        "gpus": gpus,
    }
    settings = get_settings().model_copy(update={k: v for k, v in overrides.items() if v is not None})
    from tunery.artifacts import check_storage
    from tunery.errors import TuneryError
    from tunery.store.models import parse_labels

    try:  # uploads, fetched data and runs all go there: refuse to start without it
        parse_labels(settings.worker_labels)  # the embedded workers' (TUNERY_WORKER_LABELS)
        check_storage(settings.storage, settings.storage_options)
    except (TuneryError, ValueError) as exc:
        _fail(exc)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


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
    labels: Annotated[str | None, typer.Option(
        "--labels", help="What this worker offers, KEY=VALUE comma-separated, e.g. gpu=a100,mem=80g (default: "
        "TUNERY_WORKER_LABELS). A `hardware=SKU` label names it as Replicate's models do (gpu-a100-large); "
        "trainings that ask for a SKU or labels it lacks are left to other workers.")] = None,
) -> None:
    """Run a training worker (and a webhook sender) until Ctrl-C or SIGTERM.

    A training running at that moment is stopped and handed back, to be resumed from its last
    checkpoint by the next worker that claims it.
    """
    from tunery.artifacts import check_storage
    from tunery.errors import TuneryError
    from tunery.store.models import parse_labels
    from tunery.worker.service import run_worker

    settings = get_settings()
    overrides = {"gpus": gpus, "train_processes": processes, "worker_labels": labels}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    try:  # a storage that cannot be written stops the worker here, not each training later
        parse_labels(settings.worker_labels)
        check_storage(settings.storage, settings.storage_options)
    except (TuneryError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    store = open_store(database_url)
    try:
        run_worker(store, settings, worker_id=worker_id)
    finally:
        store.close()


tokens_app = typer.Typer(
    help="API tokens, in the configured database (TUNERY_DATABASE_URL): create, list, revoke.",
    no_args_is_help=True,
)


@tokens_app.command("create")
def tokens_create(
    owner: Annotated[str, typer.Option("--owner", help="Who the token acts as (created if new).")],
    label: Annotated[str | None, typer.Option("--label", help="A note to tell tokens apart.")] = None,
    scope: Annotated[list[str] | None, typer.Option(
        "--scope", help="What it may do: read, predict, train, admin (repeat, or comma-separate; default: all).",
    )] = None,
    expires: Annotated[str | None, typer.Option(
        "--expires", help="When it stops working: a duration (90m, 12h, 30d, 2w) or a date or time "
        "(2027-01-31; UTC unless it says). Default: until revoked.",
    )] = None,
) -> None:
    """Create an API token and print it. Only its hash is stored: keep the printed token."""
    from tunery.service import tokens
    from tunery.service.errors import ServiceError

    store = open_store()
    try:
        token, _ = tokens.create(store, owner, label=label, scopes=scope, expires=expires)
    except ServiceError as exc:
        _fail(exc)
    finally:
        store.close()
    typer.echo(token)


@tokens_app.command("list")
def tokens_list(
    owner: Annotated[str | None, typer.Option("--owner", help="Only this owner's tokens.")] = None,
) -> None:
    """Every token (or one owner's): id, owner, first characters, scopes, status and dates; never
    the tokens themselves."""
    from tunery.service import tokens

    store = open_store()
    try:
        rows = [tokens.record(row) for row in store.list_tokens(owner)]
    finally:
        store.close()
    for r in rows:
        until = f"until {r['expires_at']}" if r["expires_at"] else "no expiry"
        typer.echo(f"{r['id']:>4}  {r['owner']}  {r['prefix'] or '(no prefix)'}…  {','.join(r['scopes'])}  "
                   f"{r['status']}  created {r['created_at']}  {until}  {r['label'] or ''}".rstrip())


@tokens_app.command("revoke")
def tokens_revoke(token_id: Annotated[int, typer.Argument(help="The token's ID (see `tunery tokens list`).")]) -> None:
    """Revoke a token: every API refuses it from the next request on."""
    from tunery.service import tokens
    from tunery.service.errors import ServiceError

    store = open_store()
    try:
        row = tokens.revoke(store, token_id)
    except ServiceError as exc:
        _fail(exc)
    finally:
        store.close()
    typer.echo(f"revoked token {row.id} of {row.owner} ({row.prefix or 'no prefix'}…)")


owners_app = typer.Typer(
    help="Owners' limits, in the configured database (TUNERY_DATABASE_URL): trainings running and queued, "
    "predictions at once and requests per minute, for one owner or for everyone.",
    no_args_is_help=True,
)

_LIMIT_HELP = "a whole number >= 0 (0: no limit), or 'default' to fall through to everyone's, then built in"


@owners_app.command("set-limits")
def owners_set_limits(
    owner: Annotated[str, typer.Argument(help="The owner, or '*' for everyone's limits (an owner's own win).")],
    trainings: Annotated[str | None, typer.Option(help=f"Trainings running at once: {_LIMIT_HELP}.")] = None,
    queued_trainings: Annotated[str | None, typer.Option(help=f"Trainings queued at once: {_LIMIT_HELP}.")] = None,
    predictions: Annotated[str | None, typer.Option(
        help=f"Predictions at once on one server: {_LIMIT_HELP}.")] = None,
    requests_per_minute: Annotated[str | None, typer.Option(
        help=f"API requests per minute on one server: {_LIMIT_HELP}.")] = None,
) -> None:
    """Set an owner's limits (or everyone's, with '*'); prints what applies now. Running servers
    and workers apply it within seconds."""
    from tunery.service import limits
    from tunery.service.errors import ServiceError

    store = open_store()
    try:
        record = limits.set_limits(store, owner, {"trainings": trainings, "queued_trainings": queued_trainings,
                                                  "predictions": predictions,
                                                  "requests_per_minute": requests_per_minute})
    except ServiceError as exc:
        _fail(exc)
    finally:
        store.close()
    _echo_limits(record)


@owners_app.command("limits")
def owners_limits(
    owner: Annotated[str | None, typer.Argument(help="One owner (default: everyone's, then each owner's own).")] = None,
) -> None:
    """The limits that apply, and where each comes from (owner, everyone, built in)."""
    from tunery.service import limits

    store = open_store()
    try:
        records = [limits.record(store, owner)] if owner else limits.records(store)
    finally:
        store.close()
    for record in records:
        _echo_limits(record)


def _echo_limits(record: dict) -> None:
    from tunery.service.limits import DESCRIBE

    parts = []
    for name, value in record["limits"].items():
        shown = "the server's max_queue" if value is None else "no limit" if value == 0 else str(value)
        parts.append(f"{DESCRIBE[name]} {shown} ({record['source'][name]})")
    who = "everyone" if record["owner"] == "*" else record["owner"]
    typer.echo(f"{who}: " + "; ".join(parts))


bases_app = typer.Typer(
    help="Your own base models, in the configured database (TUNERY_DATABASE_URL): they are listed in "
    "/v1/models as tunery/NAME and trained and predicted like the built-in ones.",
    no_args_is_help=True,
)


def _local_store():
    return get_settings(), open_store()


@bases_app.command("add")
def bases_add(
    name: Annotated[str, typer.Argument(help="Listed as tunery/NAME (lowercase letters, digits, '.', '_', '-').")],
    source: Annotated[
        str,
        typer.Argument(help="A model directory, a .gguf file, a Hugging Face id in the local cache, or a "
                       "storage URL of a model directory (s3://..., file://...)."),
    ],
    description: Annotated[str | None, typer.Option(help="A line about the base.")] = None,
) -> None:
    """Register a base: checks it loads (config, tokenizer, weight files), converts a GGUF or
    downloads a URL into the model cache, and hashes its weights once (cached for every start)."""
    import getpass

    from tunery.service.bases import register_base
    from tunery.store.store import Conflict

    settings, store = _local_store()
    try:
        base = register_base(store, settings, name=name, source=source, description=description,
                             registered_by=f"cli:{getpass.getuser()}")
    except (TuneryError, Conflict) as exc:
        _fail(exc)
    finally:
        store.close()
    typer.echo(f"{base['model']}:{base['version']}  {base['kind']} {base['source']}  sha256 {base['sha256'] or '-'}")


@bases_app.command("list")
def bases_list() -> None:
    """The registered bases (the built-in ones: `tunery models list`)."""
    from tunery.service.bases import base_record

    _, store = _local_store()
    try:
        cursor = None
        while True:
            page = store.list_bases(cursor=cursor)
            for model in page.items:
                b = base_record(model, store.latest_version(model.id))
                typer.echo(f"{b['model']}:{b['version']}  {b['source']}  {b['description'] or ''}".rstrip())
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    finally:
        store.close()


@bases_app.command("remove")
def bases_remove(name: Annotated[str, typer.Argument(help="The registered base's NAME.")]) -> None:
    """Remove a registered base from /v1/models (versions trained on it keep working; its cached
    conversion or download stays in the model cache)."""
    _, store = _local_store()
    try:
        if not store.remove_base(name):
            _fail(TuneryError(f"no registered base tunery/{name} (built-in bases can not be removed)"))
    finally:
        store.close()
    typer.echo(f"removed tunery/{name}")
