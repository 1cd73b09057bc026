"""Rows as Replicate's JSON objects: the one place a row becomes what clients see.

The HTTP API answers with these dicts and the store writes them as webhook bodies, so a
webhook carries exactly what `GET` returns. Plain dicts, no web framework: the store and the
worker import this module without pulling in the server. Every URL is absolute, built on
`base_url` (the server's public URL, no trailing slash), because the official client follows
the URLs it is given as they are.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from tunery import __version__
from tunery.store.models import File, Model, Prediction, Training, Version

COG_VERSION = f"tunery-{__version__}"

#: Tells the official client that a prediction's output is a list of text pieces to join
#: (`replicate.run` then returns an iterator of strings). Exactly Replicate's shape.
OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string"},
    "x-cog-array-type": "iterator",
    "x-cog-array-display": "concatenate",
}

#: The prediction inputs every tunery version takes (infer.predict.SamplingParams' names and
#: defaults, plus the prompt).
PREDICTION_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Input",
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "type": "string",
            "title": "Prompt",
            "x-order": 0,
            "description": "Text to continue, used verbatim (no chat template).",
        },
        "max_new_tokens": {
            "type": "integer",
            "title": "Max New Tokens",
            "default": 128,
            "minimum": 1,
            "x-order": 1,
            "description": "Maximum number of tokens to generate.",
        },
        "temperature": {
            "type": "number",
            "title": "Temperature",
            "default": 0.75,
            "minimum": 0,
            "x-order": 2,
            "description": "Sampling temperature; 0 is greedy.",
        },
        "top_p": {
            "type": "number",
            "title": "Top P",
            "default": 0.9,
            "exclusiveMinimum": 0,
            "maximum": 1,
            "x-order": 3,
            "description": "Sample from the smallest set of tokens with this much mass.",
        },
        "top_k": {
            "type": "integer",
            "title": "Top K",
            "default": 50,
            "minimum": 0,
            "x-order": 4,
            "description": "Sample from the k most likely tokens; 0 disables it.",
        },
        "stop_sequences": {
            "type": "string",
            "title": "Stop Sequences",
            "x-order": 5,
            "description": "Comma-separated; the output ends before the first one.",
        },
        "seed": {
            "type": "integer",
            "title": "Seed",
            "minimum": 0,
            "x-order": 6,
            "description": "Random seed, for repeatable sampling.",
        },
    },
}


def iso(value: datetime | None) -> str | None:
    """An ISO 8601 UTC timestamp ending in Z (Replicate's form); naive datetimes (as SQLite
    returns them) are taken to be UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# What a summary keeps of the metric history: enough recent points for a rate and an ETA.
SUMMARY_HISTORY = 20


def training_json(row: Training, base_url: str, *, summary: bool = False) -> dict[str, Any]:
    """Replicate's training object. `output.weights` is always this server's download URL
    for the run's archive, whatever the worker recorded, so it follows `base_url`.

    `summary` (lists with `view=summary`) leaves out the logs and, of the metrics, the sample
    generations, the data statistics and all but the last SUMMARY_HISTORY history points: what
    a page listing many trainings needs (status, progress, latest loss, ETA), in a few hundred
    bytes each however long the trainings ran."""
    url = f"{base_url}/v1/trainings/{row.id}"
    output = dict(row.output) if row.output else None
    if output is not None:
        output["weights"] = f"{url}/weights"
    metrics = row.metrics or {}
    if summary:
        history = list(metrics.get("history") or [])[-SUMMARY_HISTORY:]
        metrics = {k: v for k, v in metrics.items() if k not in ("samples", "data", "history")} | {"history": history}
    body: dict[str, Any] = {
        "id": row.id,
        "model": row.model,
        "version": row.version_id,
        "destination": row.destination,
        # Replicate's statuses have no "paused" (its client refuses other values): a paused training
        # (paused through OpenAI's jobs API) waits as "starting", with `paused: true` beside it.
        "status": "starting" if row.status == "paused" else row.status,
        "input": row.input,
        "output": output,
        "error": row.error,
        "logs": row.logs or "",
        "metrics": metrics,
        "source": "api",
        "webhook": row.webhook,
        "webhook_events_filter": row.webhook_events_filter,
        "created_at": iso(row.created_at),
        "started_at": iso(row.started_at),
        "completed_at": iso(row.completed_at),
        "urls": {"get": url, "cancel": f"{url}/cancel"},
    }
    if row.status == "paused":
        body["paused"] = True
    if summary:
        del body["logs"]
    return body


def prediction_json(row: Prediction, base_url: str) -> dict[str, Any]:
    """Replicate's prediction object; `output` is the list of text pieces so far (None before
    the first). Every prediction can be streamed, so `urls.stream` is always present."""
    url = f"{base_url}/v1/predictions/{row.id}"
    return {
        "id": row.id,
        "model": row.model,
        "version": row.version_id,
        "status": row.status,
        "input": row.input,
        "output": row.output,
        "error": row.error,
        "logs": row.logs or "",
        "metrics": row.metrics or {},
        "source": "api",
        "data_removed": False,
        "webhook": row.webhook,
        "webhook_events_filter": row.webhook_events_filter,
        "created_at": iso(row.created_at),
        "started_at": iso(row.started_at),
        "completed_at": iso(row.completed_at),
        "urls": {"get": url, "cancel": f"{url}/cancel", "stream": f"{url}/stream"},
    }


def version_json(row: Version) -> dict[str, Any]:
    """Replicate's version object, with the OpenAPI schema `replicate.run` reads."""
    return {
        "id": row.id,
        "created_at": iso(row.created_at),
        "cog_version": COG_VERSION,
        "openapi_schema": openapi_schema(),
    }


def model_json(row: Model, latest: Version | None, base_url: str) -> dict[str, Any]:
    """Replicate's model object; `latest` is its newest version (None for a new model)."""
    return {
        "url": f"{base_url}/v1/models/{row.owner}/{row.name}",
        "owner": row.owner,
        "name": row.name,
        "description": row.description,
        "visibility": row.visibility,
        "hardware": row.hardware,
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "cover_image_url": None,
        "default_example": None,
        "is_official": bool(row.is_base),
        "run_count": int(row.run_count or 0),
        "latest_version": version_json(latest) if latest is not None else None,
    }


def file_json(row: File, base_url: str) -> dict[str, Any]:
    """Replicate's file object. `urls.get` is what a client puts into an input; `urls.download`
    (a tunery addition) serves the bytes."""
    url = f"{base_url}/v1/files/{row.id}"
    return {
        "id": row.id,
        "name": row.name,
        "content_type": row.content_type,
        "size": row.size,
        "etag": row.md5,
        "checksums": {"sha256": row.sha256, "md5": row.md5},
        "metadata": row.meta or {},
        "created_at": iso(row.created_at),
        "expires_at": None,
        "urls": {"get": url, "download": f"{url}/download"},
    }


@lru_cache(maxsize=1)
def openapi_schema() -> dict[str, Any]:
    """The Cog-style OpenAPI document of every tunery version: prediction Input, the iterator
    Output, and TrainingInput generated from the typed training spec (so it cannot drift)."""
    from tunery.spec import TrainingInputs

    training = TrainingInputs.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = training.pop("$defs", {})
    training["title"] = "TrainingInput"
    return {
        "openapi": "3.0.2",
        "info": {"title": "tunery", "version": __version__},
        "paths": {},
        "components": {
            "schemas": {
                **defs,
                "Input": PREDICTION_INPUT_SCHEMA,
                "Output": OUTPUT_SCHEMA,
                "TrainingInput": training,
                "TrainingOutput": {
                    "type": "object",
                    "title": "TrainingOutput",
                    "properties": {
                        "weights": {"type": "string", "format": "uri", "title": "Weights"},
                        "version": {"type": "string", "title": "Version"},
                    },
                    "required": ["weights", "version"],
                },
            }
        },
    }
