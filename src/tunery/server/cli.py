"""Commands of the service, for the lead to wire into `tunery`: `serve_command` (tunery serve)
and the client sub-apps `trainings_app` and `predictions_app`, which talk to a running server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from tunery.errors import TuneryError

UrlOption = Annotated[str, typer.Option("--url", envvar="TUNERY_URL", help="The tunery server.")]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token", envvar=["TUNERY_TOKEN", "REPLICATE_API_TOKEN"], help="API token.", show_default=False
    ),
]
DEFAULT_URL = "http://127.0.0.1:8000"

trainings_app = typer.Typer(help="Trainings on a tunery server (see `tunery serve`).", no_args_is_help=True)
predictions_app = typer.Typer(help="Predictions on a tunery server.", no_args_is_help=True)


@predictions_app.callback()
def _predictions() -> None:
    """Predictions on a tunery server."""  # a callback keeps `create` a subcommand when used alone


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

    try:  # uploads, fetched data and runs all go there: refuse to start without it
        check_storage(settings.storage, settings.storage_options)
    except TuneryError as exc:
        _fail(exc)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


def _fail(exc: Exception) -> NoReturn:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


def _api(url: str, token: str | None):
    from tunery.server.client import Api

    return Api(url, token)


def _print(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2))


@trainings_app.command("create")
def trainings_create(
    destination: Annotated[str, typer.Option(help="Your model ('owner/name') the result is pushed to.")],
    version: Annotated[str | None, typer.Option(help="Base version 'owner/name:id'.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model name (its latest version).")] = None,
    train_data: Annotated[
        str | None,
        typer.Option(help="JSONL: a local file (uploaded first) or a URL."),
    ] = None,
    validation_data: Annotated[str | None, typer.Option(help="JSONL, like --train-data.")] = None,
    num_train_epochs: Annotated[int | None, typer.Option(help="Epochs.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    peft_method: Annotated[str | None, typer.Option(help="lora, qlora or full.")] = None,
    assignments: Annotated[
        list[str] | None,
        typer.Option(
            "--input", "-i", help="Any training input as key=value (repeatable; values read as JSON)."
        ),
    ] = None,
    webhook: Annotated[str | None, typer.Option(help="URL to POST the training to as it changes.")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Then print its logs until it ends.")] = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Create a training; the server checks the inputs and every line of the data first."""
    from tunery.server.client import parse_assignment

    try:
        api = _api(url, token)
        if (version is None) == (base is None):
            raise TuneryError("give exactly one of --version owner/name:id and --base NAME")
        inputs = dict(parse_assignment(item) for item in assignments or [])
        flags = {
            "train_data": train_data,
            "validation_data": validation_data,
            "num_train_epochs": num_train_epochs,
            "max_steps": max_steps,
            "learning_rate": learning_rate,
            "peft_method": peft_method,
        }
        inputs.update({k: v for k, v in flags.items() if v is not None})
        for key in ("train_data", "validation_data"):
            if isinstance(inputs.get(key), str) and "://" not in inputs[key] and Path(inputs[key]).is_file():
                inputs[key] = api.upload(Path(inputs[key]))["urls"]["get"]
        body = {"destination": destination, "input": inputs, "webhook": webhook}
        training = api.request("POST", api.version_path(version or base or "") + "/trainings", json=body)
    except TuneryError as exc:
        _fail(exc)
    typer.echo(training["id"])
    if follow:
        trainings_logs(training["id"], follow=True, url=url, token=token)


@trainings_app.command("list")
def trainings_list(
    limit: Annotated[int, typer.Option(help="Show at most this many, newest first.")] = 20,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Your trainings, newest first."""
    try:
        for t in _api(url, token).pages("/v1/trainings", limit):
            version = (t.get("output") or {}).get("version") or ""
            typer.echo(
                f"{t['id']}  {t['status']:<10}  {t['created_at']}  {t['model']} -> {t['destination']}  "
                f"{version}"
            )
    except TuneryError as exc:
        _fail(exc)


@trainings_app.command("get")
def trainings_get(training_id: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None) -> None:
    """A training as JSON."""
    try:
        _print(_api(url, token).request("GET", f"/v1/trainings/{training_id}"))
    except TuneryError as exc:
        _fail(exc)


@trainings_app.command("cancel")
def trainings_cancel(training_id: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None) -> None:
    """Cancel a training (a running one stops within seconds)."""
    try:
        training = _api(url, token).request("POST", f"/v1/trainings/{training_id}/cancel")
    except TuneryError as exc:
        _fail(exc)
    typer.echo(f"{training['id']} {training['status']}")


@trainings_app.command("logs")
def trainings_logs(
    training_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the training ends.")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """A training's logs; with --follow, new lines as they come, then its final status."""
    try:
        api = _api(url, token)
        if not follow:
            typer.echo(api.request("GET", f"/v1/trainings/{training_id}").get("logs") or "", nl=False)
            return
        for text in api.follow_logs(training_id):
            sys.stdout.write(text)
            sys.stdout.flush()
        training = api.request("GET", f"/v1/trainings/{training_id}")
    except TuneryError as exc:
        _fail(exc)
    output = training.get("output") or {}
    typer.echo(
        f"\n{training['status']}"
        + (f": {output['version']}" if output.get("version") else "")
        + (f": {training['error']}" if training.get("error") else ""),
        err=True,
    )
    if training["status"] != "succeeded":
        raise typer.Exit(1)


@predictions_app.command("create")
def predictions_create(
    version: Annotated[
        str, typer.Option(help="'owner/name:id' (e.g. a training's output version) or 'owner/name'.")
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text ('-' reads stdin).")],
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they are generated.")] = False,
    max_new_tokens: Annotated[int | None, typer.Option(help="Maximum tokens to generate.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature; 0 is greedy.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = None,
    stop_sequences: Annotated[str | None, typer.Option(help="Comma-separated stops.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Run a version on a prompt and print the text."""
    if prompt == "-":
        prompt = sys.stdin.read()
    given = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "stop_sequences": stop_sequences,
        "seed": seed,
    }
    body = {
        "version": version,
        "input": {"prompt": prompt} | {k: v for k, v in given.items() if v is not None},
        "stream": stream,
    }
    try:
        api = _api(url, token)
        if stream:
            prediction = api.request("POST", "/v1/predictions", json=body)
            for event, data in api.stream(prediction["urls"]["stream"]):
                if event == "output":
                    sys.stdout.write(data)
                    sys.stdout.flush()
                elif event == "error":
                    raise TuneryError(json.loads(data).get("detail", data))
        else:
            prediction = api.request("POST", "/v1/predictions", json=body, headers={"Prefer": "wait"})
            prediction = api.wait_prediction(prediction)
            if prediction["status"] != "succeeded":
                raise TuneryError(
                    f"prediction {prediction['id']} {prediction['status']}: {prediction.get('error')}"
                )
            sys.stdout.write("".join(prediction.get("output") or []))
        sys.stdout.write("\n")
    except TuneryError as exc:
        _fail(exc)


def models_create(
    model: Annotated[str, typer.Argument(help="The new model, 'owner/name' (owner: your token's).")],
    visibility: Annotated[str, typer.Option(help="private or public.")] = "private",
    description: Annotated[str | None, typer.Option(help="A line about the model.")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Create a destination model on a server (trainings push their versions to it)."""
    owner, _, name = model.partition("/")
    try:
        if not owner or not name:
            raise TuneryError(f"model must be 'owner/name', got {model!r}")
        body = {"owner": owner, "name": name, "visibility": visibility, "hardware": "cpu",
                "description": description}
        _print(_api(url, token).request("POST", "/v1/models", json=body))
    except TuneryError as exc:
        _fail(exc)


bases_app = typer.Typer(
    help="Your own base models, in the configured database (TUNERY_DATABASE_URL): they are listed in "
    "/v1/models as tunery/NAME and trained and predicted like the built-in ones.",
    no_args_is_help=True,
)


def _local_store():
    from tunery.settings import get_settings
    from tunery.store.store import Store

    settings = get_settings()
    return settings, Store(settings.db_url)


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

    from tunery.server.bases import register_base
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
    from tunery.server.bases import base_json

    _, store = _local_store()
    try:
        cursor = None
        while True:
            page = store.list_bases(cursor=cursor)
            for model in page.items:
                b = base_json(model, store.latest_version(model.id))
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
