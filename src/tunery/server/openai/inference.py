"""OpenAI's inference API under its own prefix (`/openai/v1`, so Replicate's `/v1` keeps its
shapes), on the same tokens, models and serving engine as the predictions: point the official
`openai` client at `<server>/openai/v1` with a tunery token as its API key.

- `GET /models`, `GET /models/{id}`: the models you may use, by Replicate's names: a base
  (`tunery/smollm2-135m`), a model's latest version (`alice/bookings`) or one version
  (`alice/bookings:<version id>`).
- `POST /chat/completions`: messages rendered with the chat template the model was trained with
  (the run's tokenizer; the base's for a base), streamed or not, with temperature, top_p,
  max_tokens / max_completion_tokens, stop, seed, usage and finish_reason, and vLLM's
  `min_tokens` and `ignore_eos`.
- `POST /completions`: the same on a raw prompt.

Errors come in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`); a full engine
answers 429 with Retry-After, as the predictions do.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunery.chat_templates import generation_prompt
from tunery.server.deps import Owner, RunnerDep, SettingsDep, StoreDep
from tunery.server.openai.errors import OpenAIError, from_service
from tunery.server.openai.names import FT_MODEL_PREFIX, fine_tuned_name, resolve_model
from tunery.service import predictions
from tunery.service.errors import ServiceError

router = APIRouter(prefix="/openai/v1", tags=["openai"])

#: max_tokens when a request gives none (OpenAI documents no number: "the model's limit").
OPENAI_MAX_TOKENS = 256

class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # vLLM's extensions, which its serving benchmark sends: no end-of-sequence before min_tokens,
    # or none at all (every answer runs to max_tokens).
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False


class ChatBody(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)


class CompletionBody(_Sampling):
    prompt: str


def _model_json(model_id: str, owner: str, created: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(created.timestamp()) if created else 0,
            "owned_by": owner}


@router.get("/models")
def list_models(owner: Owner, store: StoreDep) -> dict[str, Any]:
    """The models this token may use: each model by its name (its latest version) and each version,
    and the fine-tuned models of the fine-tuning jobs (`ft:...`), under those names only."""
    data = []
    cursor = None
    while True:
        page = store.list_models(owner, cursor=cursor, limit=1000)
        for model in page.items:
            name = f"{model.owner}/{model.name}"
            if model.owner == owner and model.name.startswith(FT_MODEL_PREFIX):
                continue  # a fine-tuning job's model: listed by its ft: name below
            latest = store.latest_version(model.id)
            if latest is None:
                continue
            data.append(_model_json(name, model.owner, model.created_at))
            if not model.is_base:
                versions = store.list_versions(model.id, limit=1000).items
                data += [_model_json(f"{name}:{v.id}", model.owner, v.created_at) for v in versions]
        cursor = page.next_cursor
        if not cursor:
            break
    after = None
    while True:
        jobs, more = store.list_fine_tuning_jobs(owner, after=after, limit=1000)
        for job in jobs:
            ft = fine_tuned_name(job)
            if ft and job.status == "succeeded" and not (job.openai or {}).get("deleted"):
                data.append(_model_json(ft, owner, job.completed_at))
        if not more or not jobs:
            break
        after = jobs[-1].id
    return {"object": "list", "data": data}


@router.get("/models/{model_id:path}")
def get_model(model_id: str, owner: Owner, store: StoreDep, settings: SettingsDep):
    try:
        model, version = resolve_model(store, owner, model_id, settings)
    except OpenAIError as e:
        return e.response()
    return _model_json(model_id, model.owner, version.created_at)


def _params(body: _Sampling):
    """SamplingParams from OpenAI's names, with OpenAI's defaults where it documents one
    (temperature 1, top_p 1, no top-k); the rest are SamplingParams' own."""
    from tunery.infer.generation import SamplingParams

    if body.n != 1:
        raise OpenAIError(400, "only n=1 is supported", param="n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise OpenAIError(400, "stop takes at most 4 sequences", param="stop")
    max_new_tokens = body.max_completion_tokens or body.max_tokens or OPENAI_MAX_TOKENS
    if body.min_tokens > max_new_tokens:
        raise OpenAIError(400, f"min_tokens ({body.min_tokens}) must be at most max_tokens ({max_new_tokens})",
                          param="min_tokens")
    given: dict[str, Any] = {"max_new_tokens": max_new_tokens,
             "min_new_tokens": max_new_tokens if body.ignore_eos else body.min_tokens,
             "temperature": 1.0 if body.temperature is None else body.temperature,
             "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": 0, "stop_sequences": stops or None,
             "seed": body.seed}
    try:
        return SamplingParams(**given)
    except ValueError as e:
        raise OpenAIError(400, str(e)) from None


def _finish_reason(stop_reason: str | None) -> str:
    return "length" if stop_reason == "max_new_tokens" else "stop"


def _generate(runner, store, settings, owner: str, body: _Sampling, prompt_for) -> tuple[Any, Any]:
    """(generation, slot): the request submitted to its base's engine, in a slot of the runner's
    capacity (the caller releases it when the answer is sent)."""
    model, version = resolve_model(store, owner, body.model, settings)
    params = _params(body)
    try:
        [slot] = predictions.take_slots(runner, owner)
    except ServiceError as e:
        raise from_service(e) from None
    try:
        prompt = prompt_for(predictions.tokenizer_for(settings, version))
        generation = predictions.generate(runner, settings, version, prompt, params, owner)
    except ServiceError as e:
        slot.release()
        raise from_service(e) from None
    except BaseException:
        slot.release()
        raise
    return generation, slot


async def _respond(slot, generation, body: _Sampling, kind: str, make_choice, make_delta):
    """The whole answer, or an SSE stream of chunks ending in `data: [DONE]`. Both wait on the
    event loop (no thread is held while the engine generates)."""
    ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
    created = int(time.time())
    obj = "chat.completion" if kind == "chat" else "text_completion"

    def usage() -> dict[str, int]:
        m = generation.metrics
        prompt, completion = int(m.get("input_token_count") or 0), int(m.get("output_token_count") or 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    if not body.stream:
        try:
            text = await generation.atext()
        except Exception as e:
            raise OpenAIError(500, f"generation failed: {e}", type="server_error") from None
        finally:
            generation.cancel()  # a client gone before the end ends the generation
            slot.release()
        reason = _finish_reason(generation.metrics.get("stop_reason"))
        return {"id": ident, "object": obj, "created": created, "model": body.model,
                "choices": [make_choice(text, reason)], "usage": usage(), "system_fingerprint": None}

    chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[str]:
        def chunk(choices: list, **extra: Any) -> str:
            return "data: " + json.dumps({"id": ident, "object": chunk_obj, "created": created, "model": body.model,
                                          "choices": choices, **extra}) + "\n\n"

        # The assistant's role goes with the first token (as OpenAI and vLLM send it), so a client
        # timing its first chunk times the first token.
        role = kind == "chat"
        try:
            async for piece in generation:
                if role:
                    role = False
                    yield chunk([make_delta({"role": "assistant", "content": ""}, None)])
                yield chunk([make_delta({"content": piece} if kind == "chat" else piece, None)])
            if role:
                yield chunk([make_delta({"role": "assistant", "content": ""}, None)])
            reason = _finish_reason(generation.metrics.get("stop_reason"))
            yield chunk([make_delta({} if kind == "chat" else "", reason)])
            if include_usage:
                yield chunk([], usage=usage())
            yield "data: [DONE]\n\n"
        except Exception as e:
            yield "data: " + json.dumps({"error": {"message": f"generation failed: {e}", "type": "server_error"}}) + "\n\n"
        finally:
            generation.cancel()  # a client gone mid-stream ends the generation
            slot.release()

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/chat/completions")
async def chat_completions(body: ChatBody, owner: Owner, store: StoreDep, settings: SettingsDep, runner: RunnerDep):
    """A chat completion: the messages in the model's chat template, then the assistant's answer."""
    def prompt_for(tokenizer) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise OpenAIError(400, f"the model '{body.model}' has no chat template: use /completions",
                              param="messages")
        messages = [{"role": m.get("role"), "content": _content(m)} for m in body.messages]
        return generation_prompt(tokenizer, messages)

    try:
        generation, slot = await run_in_threadpool(_generate, runner, store, settings, owner, body, prompt_for)
        return await _respond(slot, generation, body, "chat",
                        lambda text, reason: {"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": reason, "logprobs": None},
                        lambda delta, reason: {"index": 0, "delta": delta, "finish_reason": reason,
                                               "logprobs": None})
    except OpenAIError as e:
        return e.response()


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


@router.post("/completions")
async def completions(body: CompletionBody, owner: Owner, store: StoreDep, settings: SettingsDep, runner: RunnerDep):
    """A completion of a raw prompt."""
    try:
        generation, slot = await run_in_threadpool(_generate, runner, store, settings, owner, body,
                                                   lambda tokenizer: body.prompt)
        return await _respond(slot, generation, body, "completion",
                        lambda text, reason: {"index": 0, "text": text, "finish_reason": reason, "logprobs": None},
                        lambda text, reason: {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
    except OpenAIError as e:
        return e.response()
