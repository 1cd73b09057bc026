"""Request bodies of Replicate's API, as its clients send them. (Responses are built by
`shapes`, which the webhooks share.) Fields the official client sends that
tunery has no use for (webhook_completed, github_url, ...) are accepted and ignored."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tunery.service.bases import NAME_PATTERN

WebhookEvent = Literal["start", "output", "logs", "completed"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Webhooks(_Body):
    webhook: str | None = Field(None, description="http(s) URL to POST the object to as it changes.")
    webhook_events_filter: list[WebhookEvent] | None = Field(
        None, description="Which events to send: start, output, logs, completed (default: all)."
    )

    @field_validator("webhook")
    @classmethod
    def _http_only(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("must be an http:// or https:// URL")
        return value


class ModelCreate(_Body):
    """POST /v1/models."""

    owner: str = Field(description="Must be the caller's own account name.")
    name: str = Field(pattern=NAME_PATTERN, description="Lowercase letters, digits, '.', '_' and '-'.")
    visibility: Literal["public", "private"] = "private"
    hardware: str = Field("cpu", max_length=64)
    description: str | None = None


class BaseCreate(_Body):
    """POST /v1/bases."""

    name: str = Field(pattern=NAME_PATTERN, description="Listed as tunery/<name>: lowercase letters, digits, "
                      "'.', '_' and '-'.")
    source: str = Field(min_length=1, max_length=500, description="A model directory or .gguf file on the "
                        "server, a Hugging Face id in its cache, or a storage URL (s3://..., file://...).")
    description: str | None = None


class TrainingCreate(_Webhooks):
    """POST /v1/models/{owner}/{name}/versions/{id}/trainings."""

    destination: str = Field(description="The model ('owner/name') the trained version is pushed to.")
    input: dict[str, Any] = Field(default_factory=dict, description="The training inputs (TrainingInputs).")
    hardware: str | None = Field(None, max_length=200, description=(
        "Where it runs: a SKU that GET /v1/hardware lists (gpu-a100-large), or worker labels (gpu=a100,mem=80g); "
        "default: the destination model's hardware ('cpu', Replicate's default, lets any worker run it)."))


class PredictionCreate(_Webhooks):
    """POST /v1/predictions (with `version`) and POST /v1/models/{owner}/{name}/predictions."""

    version: str | None = Field(None, description="A version id, or 'owner/name:id', or 'owner/name'.")
    input: dict[str, Any] = Field(
        description="prompt, max_new_tokens, min_new_tokens, temperature, top_p, top_k, stop_sequences, seed."
    )
    stream: bool = False


class ExportCreate(BaseModel):
    """POST /v1/trainings/{id}/exports."""

    model_config = ConfigDict(extra="forbid")

    format: str = Field("merged", description="merged (a Hugging Face model folder), gguf (llama.cpp) or ollama "
                        "(GGUF + Modelfile).")
    dtype: str = Field("bf16", description="merged: bf16, f16 or f32.")
    quant: str = Field("q8_0", description="gguf / ollama: q8_0, f16, bf16, f32, or 4-/5-bit q4_0, q4_1, q5_0, q5_1.")
