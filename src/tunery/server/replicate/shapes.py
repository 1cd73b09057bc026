"""Rows as Replicate's JSON objects: the one place a row becomes what Replicate's clients see.

The HTTP API answers with these dicts, and the store is given `webhook_body` to write webhook
bodies with, so a webhook carries exactly what `GET` returns. Replicate's rules of presentation
live here too (a paused training shows as "starting"). Every URL is absolute, built on
`base_url` (the server's public URL, no trailing slash), because the official client follows
the URLs it is given as they are.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any

from tunery.artifacts.run import checkpoint_step
from tunery.store.models import File, Model, Prediction, Training, Version, iso
from tunery.version import __version__

COG_VERSION = f"tunery-{__version__}"

#: Tells the official client that a prediction's output is a list of text pieces to join
#: (`replicate.run` then returns an iterator of strings). Exactly Replicate's shape.
OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string"},
    "x-cog-array-type": "iterator",
    "x-cog-array-display": "concatenate",
}

#: The prediction inputs every tunery version takes (besides the prompt): their JSON types,
#: bounds and descriptions. The defaults are SamplingParams' own (see `prediction_input_schema`).
_SAMPLING_FIELDS: dict[str, dict[str, Any]] = {
    "max_new_tokens": {"type": "integer", "title": "Max New Tokens", "minimum": 1,
                       "description": "Maximum number of tokens to generate."},
    "min_new_tokens": {"type": "integer", "title": "Min New Tokens", "minimum": -1,
                       "description": "Minimum number of tokens to generate before end-of-sequence may "
                                      "end it. To disable, set to -1."},
    "temperature": {"type": "number", "title": "Temperature", "minimum": 0,
                    "description": "Sampling temperature; 0 is greedy."},
    "top_p": {"type": "number", "title": "Top P", "exclusiveMinimum": 0, "maximum": 1,
              "description": "Sample from the smallest set of tokens with this much mass."},
    "top_k": {"type": "integer", "title": "Top K", "minimum": 0,
              "description": "Sample from the k most likely tokens; 0 disables it."},
    "stop_sequences": {"type": "string", "title": "Stop Sequences",
                       "description": "Comma-separated; the output ends before the first one."},
    "seed": {"type": "integer", "title": "Seed", "minimum": 0, "description": "Random seed, for repeatable sampling."},
}


@lru_cache(maxsize=1)
def prediction_input_schema() -> dict[str, Any]:
    """The Cog-style Input schema of every version: the prompt, then SamplingParams' fields with
    their defaults (the engine's, so the schema, the CLI and the dashboard show the same ones)."""
    from tunery.infer.generation import SamplingParams

    defaults = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    properties: dict[str, Any] = {"prompt": {"type": "string", "title": "Prompt", "x-order": 0,
                                             "description": "Text to continue, used verbatim (no chat template)."}}
    for order, (name, schema) in enumerate(_SAMPLING_FIELDS.items(), start=1):
        default = {"default": defaults[name]} if defaults.get(name) is not None else {}
        properties[name] = {"type": schema["type"], "title": schema["title"], **default,
                            **{k: v for k, v in schema.items() if k not in ("type", "title")}, "x-order": order}
    return {"type": "object", "title": "Input", "required": ["prompt"], "properties": properties}


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
    """Replicate's version object, with the OpenAPI schema `replicate.run` reads, and (tunery's) the
    training that made it and, for a checkpoint kept as a version, its step."""
    out: dict[str, Any] = {
        "id": row.id,
        "created_at": iso(row.created_at),
        "cog_version": COG_VERSION,
        "openapi_schema": openapi_schema(),
    }
    if row.training_id:
        out["training"] = {"id": row.training_id, "checkpoint_step": checkpoint_step(row.run_url)}
    return out


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
                "Input": prediction_input_schema(),
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


def export_json(training_id: str, base_url: str, entry: dict[str, Any]) -> dict[str, Any]:
    """An export of a training (its name, format, state and where to download it)."""
    from tunery.export.exporter import file_name

    out = {"name": entry["name"], "format": entry["format"], "status": entry.get("status", "succeeded"),
           "error": entry.get("error"), "file": file_name(entry["name"]),
           "urls": {"download": f"{base_url}/v1/trainings/{training_id}/exports/{entry['name']}"}}
    for key in ("check", "max_abs_diff", "relative_diff", "tolerance", "argmax_agreement", "ollama_create",
                "dtype", "quant"):
        if key in entry:
            out[key] = entry[key]
    return out


def webhook_body(row: Training | Prediction, base_url: str) -> dict[str, Any]:
    """A webhook's body: the object as GET /v1/trainings/{id} or /v1/predictions/{id} answers it."""
    if isinstance(row, Training):
        return training_json(row, base_url)
    return prediction_json(row, base_url)
