"""The command-line client of a running server (`tunery trainings ...`, `tunery predictions ...`,
`tunery models create`): typer commands over `tunery.client.api.Api`, Replicate's HTTP API."""

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


def _fail(exc: Exception) -> NoReturn:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


def _api(url: str, token: str | None):
    from tunery.client.api import Api

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
    from tunery.client.api import parse_assignment

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


