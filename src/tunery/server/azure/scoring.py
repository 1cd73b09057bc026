"""Azure ML's scoring schema for text generation, on a version: what an Azure online endpoint of
a Llama model answers, so scoring code written for one runs against tunery.

    POST /v1/models/{owner}/{name}/score                      (the model's latest version)
    POST /v1/models/{owner}/{name}/versions/{version_id}/score
    {"input_data": {"input_string": ["I believe the meaning of life is"],
                    "parameters": {"top_p": 0.9, "temperature": 0.7, "max_new_tokens": 50, "do_sample": true}}}
    → [{"0": "I believe the meaning of life is to live. ..."}]

One record per input string, its generated text under "0" after the prompt (Azure's default,
`return_full_text`; false gives the generation alone). `do_sample: false` (Azure's default) is
greedy. The inputs run at once on the serving engine the predictions use.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from tunery.errors import TuneryError
from tunery.server.deps import Owner, PathModel, RunnerDep, SettingsDep, StoreDep
from tunery.server.errors import ApiError, invalid
from tunery.service import predictions
from tunery.service.errors import Busy, NotFound, ServiceError
from tunery.store.models import Version

router = APIRouter(tags=["azure"])

#: Azure's parameters, and the SamplingParams each sets. Azure's own defaults: do_sample false
#: (greedy), and when sampling temperature 1.0 and top_p 1.0; the rest are SamplingParams'.
KNOWN = {"top_p", "top_k", "temperature", "max_new_tokens", "do_sample", "return_full_text", "seed",
         "stop_sequences"}


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_string: list[str] = Field(min_length=1, max_length=64)
    parameters: dict[str, Any] = Field(default_factory=dict)


class ScoreBody(BaseModel):
    input_data: _Input


def _params(parameters: dict[str, Any]):
    from tunery.infer.generation import SamplingParams

    unknown = sorted(set(parameters) - KNOWN)
    if unknown:
        raise invalid(f"input_data.parameters: unknown parameter {unknown[0]!r} (known: {', '.join(sorted(KNOWN))})",
                      [{"field": f"input_data.parameters.{unknown[0]}", "reason": "unknown parameter"}])
    sample = bool(parameters.get("do_sample", False))
    given: dict[str, Any] = {"temperature": float(parameters.get("temperature", 1.0)) if sample else 0.0,
                             "top_p": float(parameters.get("top_p", 1.0)),
                             "stop_sequences": parameters.get("stop_sequences"), "seed": parameters.get("seed")}
    try:
        if "max_new_tokens" in parameters:
            given["max_new_tokens"] = int(parameters["max_new_tokens"])
        if "top_k" in parameters:
            given["top_k"] = int(parameters["top_k"])
        return SamplingParams(**given)
    except (TypeError, ValueError) as e:
        raise invalid(f"input_data.parameters: {e}", [{"field": "input_data.parameters", "reason": str(e)}]) from None


async def _score(version: Version, body: ScoreBody, settings, runner, owner: str) -> list[dict[str, str]]:
    """Generate for every prompt at once; waits on the event loop (no thread held meanwhile)."""
    params = _params(body.input_data.parameters)
    full = bool(body.input_data.parameters.get("return_full_text", True))
    prompts = body.input_data.input_string
    try:
        slots = predictions.take_slots(runner, owner, len(prompts))
    except Busy as e:
        raise ApiError(429, e.message, title="Too many requests",
                       headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
    generations = []
    try:
        for p in prompts:
            generations.append(await run_in_threadpool(predictions.generate, runner, settings, version, p, params,
                                                       owner))
        texts = [await g.atext() for g in generations]
    except Busy as e:
        raise ApiError(429, e.message, title="Too many requests", headers={"Retry-After": "1"}) from None
    except ServiceError as e:
        raise invalid(e.message, [{"field": "input_data", "reason": e.message}]) from None
    except (TuneryError, ValueError) as e:  # the engine refused it while generating
        raise invalid(str(e), [{"field": "input_data", "reason": str(e)}]) from None
    finally:
        for g in generations:
            g.cancel()  # a refused or abandoned request ends the others (no-op for those finished)
        for slot in slots:
            slot.release()
    return [{"0": (prompt + text) if full else text} for prompt, text in zip(prompts, texts, strict=True)]


@router.post("/v1/models/{model_owner}/{model_name}/score")
async def score_latest(body: ScoreBody, model: PathModel, store: StoreDep, settings: SettingsDep,
                       runner: RunnerDep, owner: Owner) -> list[dict[str, str]]:
    """Azure ML's scoring request on the model's latest version."""
    try:
        version = await run_in_threadpool(predictions.latest_version, store, model)
    except NotFound:
        raise ApiError(404, f"model {model.owner}/{model.name} has no version yet", title="Not found") from None
    return await _score(version, body, settings, runner, owner)


@router.post("/v1/models/{model_owner}/{model_name}/versions/{version_id}/score")
async def score_version(body: ScoreBody, model: PathModel, version_id: str, store: StoreDep,
                        settings: SettingsDep, runner: RunnerDep, owner: Owner) -> list[dict[str, str]]:
    """Azure ML's scoring request on one version."""
    version = await run_in_threadpool(store.get_version, model.id, version_id)
    if version is None:
        raise ApiError(404, f"version {version_id} of {model.owner}/{model.name} not found", title="Not found")
    return await _score(version, body, settings, runner, owner)
