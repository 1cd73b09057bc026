"""OpenAI's inference API under its own prefix (`/openai/v1`, so Replicate's `/v1` keeps its
shapes), on the same tokens, models and serving engine as the predictions: point the official
`openai` client at `<server>/openai/v1` with a tunery token as its API key.

- `GET /models`, `GET /models/{id}`: the models you may use, by Replicate's names: a base
  (`tunery/smollm2-135m`), a model's latest version (`alice/bookings`) or one version
  (`alice/bookings:<version id>`).
- `POST /chat/completions`: messages rendered with the chat template the model was trained with
  (the run's tokenizer; the base's for a base), streamed or not, with temperature, top_p,
  max_tokens / max_completion_tokens, stop, seed, usage and finish_reason.
- `POST /completions`: the same on a raw prompt.

Errors come in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`); a full engine
answers 429 with Retry-After, as the predictions do.
"""

from __future__ import annotations

import inspect
import json
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunery.server.deps import Owner, RunnerDep, SettingsDep, StoreDep

router = APIRouter(prefix="/openai/v1", tags=["openai"])

_TOKENIZERS: dict[str, Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


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
def get_model(model_id: str, owner: Owner, store: StoreDep):
    try:
        model, version = _resolve(store, owner, model_id)
    except OpenAIError as e:
        return e.response()
    return _model_json(model_id, model.owner, version.created_at)


#: The models fine-tuning jobs push their versions to are named this, then the training's id.
FT_MODEL_PREFIX = "ftjob-"


def fine_tuned_name(job) -> str | None:
    """The `ft:` name of a fine-tuning job's model (whatever the job's state); None for a training
    created through Replicate's API."""
    return (job.openai or {}).get("fine_tuned_model")


def resolve_fine_tuned(store, owner: str, model_id: str):
    """(training, model row, version row) of a fine-tuned model: `ft:<base>:<owner>:<suffix>:<job>`
    (the job's id is the training's), or its final checkpoint `...:ckpt-step-<N>`. OpenAIError 404
    when there is no such model of the caller's (not succeeded, deleted, or another checkpoint)."""
    missing = OpenAIError(404, f"The model '{model_id}' does not exist or you do not have access to it.",
                          param="model", code="model_not_found")
    parts = model_id.split(":")
    step = None
    if parts[-1].startswith("ckpt-step-") and parts[-1][len("ckpt-step-"):].isdigit():
        step = int(parts.pop()[len("ckpt-step-"):])
    if len(parts) < 5:
        raise missing
    job = store.get_training(owner, parts[-1])
    if job is None or fine_tuned_name(job) != ":".join(parts) or job.status != "succeeded" or not job.output:
        raise missing
    if step is not None and step != final_step(job):
        raise OpenAIError(404, f"The model '{model_id}' is an intermediate checkpoint: tunery serves a job's "
                          "final checkpoint (its fine_tuned_model) only", param="model", code="model_not_found")
    dest_owner, _, dest_name = job.destination.partition("/")
    model = store.get_model(owner, dest_owner, dest_name)
    version = store.get_version(model.id, str(job.output.get("version", "")).rpartition(":")[2]) if model else None
    if model is None or version is None:
        raise missing
    return job, model, version


def final_step(job) -> int | None:
    """The last optimizer step a training reported."""
    steps = [h["step"] for h in (job.metrics or {}).get("history") or [] if isinstance(h.get("step"), int)]
    return max(steps) if steps else (job.metrics or {}).get("step")


def _resolve(store, owner: str, model_id: str):
    """(model row, version row) of "owner/name" (its latest version) or "owner/name:version", or a
    fine-tuned model's `ft:` name."""
    if model_id.startswith("ft:"):
        _, model, version = resolve_fine_tuned(store, owner, model_id)
        return model, version
    name, _, version_id = model_id.partition(":")
    model_owner, slash, model_name = name.partition("/")
    missing = OpenAIError(404, f"The model '{model_id}' does not exist or you do not have access to it.",
                          param="model", code="model_not_found")
    if not slash:
        raise missing
    model = store.get_model(owner, model_owner, model_name)
    if model is None:
        raise missing
    version = store.get_version(model.id, version_id) if version_id else store.latest_version(model.id)
    if version is None:
        raise missing
    return model, version


def _tokenizer(settings, base: str, run_url: str | None):
    """The tokenizer the model was trained with: the run's, or the base's."""
    key = run_url or f"base:{base}"
    with _TOKENIZERS_LOCK:
        found = _TOKENIZERS.get(key)
    if found is not None:
        return found
    from tunery.infer.embedded import load_tokenizer_dir
    from tunery.infer.weights import resolve_weights
    from tunery.models.load import load_tokenizer
    from tunery.models.resolve import resolve_base

    weights = resolve_weights(run_url, settings) if run_url else None
    if weights is not None and weights.tokenizer is not None:
        tokenizer = load_tokenizer_dir(weights.tokenizer, weights.source)
    else:
        tokenizer = load_tokenizer(resolve_base((weights.base if weights else None) or base, settings))
    with _TOKENIZERS_LOCK:
        _TOKENIZERS[key] = tokenizer
    return tokenizer


def _params(body: _Sampling):
    from tunery.infer.engine import SamplingParams

    if body.n != 1:
        raise OpenAIError(400, "only n=1 is supported", param="n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise OpenAIError(400, "stop takes at most 4 sequences", param="stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    try:
        return SamplingParams(max_new_tokens=body.max_completion_tokens or body.max_tokens or 256,
                              temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p, top_k=0,
                              stop_sequences=stops or None, seed=body.seed)
    except ValueError as e:
        raise OpenAIError(400, str(e)) from None


def _finish_reason(stop_reason: str | None) -> str:
    return "length" if stop_reason == "max_new_tokens" else "stop"


def _generate(runner, store, settings, owner: str, body: _Sampling, prompt_for) -> tuple[Any, Any]:
    """(generation, version): the request submitted to its base's engine within the runner's capacity."""
    from tunery.errors import TuneryError
    from tunery.infer.engine import EngineBusy, Request

    model, version = _resolve(store, owner, body.model)
    params = _params(body)
    if not runner.reserve():
        raise OpenAIError(429, "Too many requests in flight: try again shortly", type="rate_limit_error",
                          headers={"Retry-After": "1"})
    try:
        prompt = prompt_for(_tokenizer(settings, version.base_name, version.run_url))
        request = Request.make(prompt, weights=version.run_url, params=params, settings=settings)
        generation = runner.engine(version.base_name).submit(request)
    except EngineBusy as e:
        runner.unreserve()
        raise OpenAIError(429, str(e), type="rate_limit_error", headers={"Retry-After": "1"}) from None
    except (TuneryError, ValueError) as e:
        runner.unreserve()
        raise OpenAIError(400, str(e)) from None
    except BaseException:
        runner.unreserve()
        raise
    return generation, version


def _respond(runner, generation, body: _Sampling, kind: str, make_choice, make_delta):
    """The whole answer, or an SSE stream of chunks ending in `data: [DONE]`."""
    ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
    created = int(time.time())
    obj = "chat.completion" if kind == "chat" else "text_completion"

    def usage() -> dict[str, int]:
        m = generation.metrics
        prompt, completion = int(m.get("input_token_count") or 0), int(m.get("output_token_count") or 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    if not body.stream:
        try:
            text = generation.text()
        except Exception as e:
            raise OpenAIError(500, f"generation failed: {e}", type="server_error") from None
        finally:
            runner.unreserve()
        reason = _finish_reason(generation.metrics.get("stop_reason"))
        return {"id": ident, "object": obj, "created": created, "model": body.model,
                "choices": [make_choice(text, reason)], "usage": usage(), "system_fingerprint": None}

    chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def events() -> Iterator[str]:
        def chunk(choices: list, **extra: Any) -> str:
            return "data: " + json.dumps({"id": ident, "object": chunk_obj, "created": created, "model": body.model,
                                          "choices": choices, **extra}) + "\n\n"

        try:
            if kind == "chat":
                yield chunk([make_delta({"role": "assistant", "content": ""}, None)])
            for piece in generation:
                yield chunk([make_delta({"content": piece} if kind == "chat" else piece, None)])
            reason = _finish_reason(generation.metrics.get("stop_reason"))
            yield chunk([make_delta({} if kind == "chat" else "", reason)])
            if include_usage:
                yield chunk([], usage=usage())
            yield "data: [DONE]\n\n"
        except Exception as e:
            yield "data: " + json.dumps({"error": {"message": f"generation failed: {e}", "type": "server_error"}}) + "\n\n"
        finally:
            generation.cancel()  # a client gone mid-stream ends the generation
            runner.unreserve()

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/chat/completions")
def chat_completions(body: ChatBody, owner: Owner, store: StoreDep, settings: SettingsDep, runner: RunnerDep):
    """A chat completion: the messages in the model's chat template, then the assistant's answer."""
    def prompt_for(tokenizer) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise OpenAIError(400, f"the model '{body.model}' has no chat template: use /completions",
                              param="messages")
        messages = [{"role": m.get("role"), "content": _content(m)} for m in body.messages]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    try:
        generation, _ = _generate(runner, store, settings, owner, body, prompt_for)
        return _respond(runner, generation, body, "chat",
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
def completions(body: CompletionBody, owner: Owner, store: StoreDep, settings: SettingsDep, runner: RunnerDep):
    """A completion of a raw prompt."""
    try:
        generation, _ = _generate(runner, store, settings, owner, body, lambda tokenizer: body.prompt)
        return _respond(runner, generation, body, "completion",
                        lambda text, reason: {"index": 0, "text": text, "finish_reason": reason, "logprobs": None},
                        lambda text, reason: {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
    except OpenAIError as e:
        return e.response()


_UNION_TAGS = {"int", "float", "str", "bool", "none", "list", "dict"}


def _param(loc) -> str | None:
    """The parameter an error's location names (its body/query part dropped, and the union member tags
    pydantic adds, such as `literal['auto']` or `constrained-int`)."""
    parts = [str(p) for p in list(loc)[1:]
             if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p or "-" in p))]
    return ".".join(parts) or None


def install(app) -> None:
    """OpenAI's error shape for bad bodies under the prefix too."""
    from fastapi.exceptions import RequestValidationError

    previous = app.exception_handlers.get(RequestValidationError)

    async def handler(request: Request, exc: RequestValidationError):
        if request.url.path.startswith("/openai/"):
            errors = exc.errors()
            first = errors[0] if errors else {}
            param = _param(first.get("loc", []))
            # A value that fits none of a union's types ("auto" or a number) fails each of them.
            reasons = list(dict.fromkeys(e.get("msg", "invalid") for e in errors if _param(e.get("loc", [])) == param))
            message = f"{param or 'body'}: {', or '.join(reasons) or 'invalid request'}"
            return OpenAIError(400, message, param=param).response()
        if previous is None:
            return JSONResponse({"detail": exc.errors()}, status_code=422)
        answer = previous(request, exc)  # the /v1 handler: sync or async
        return await answer if inspect.isawaitable(answer) else answer

    app.add_exception_handler(RequestValidationError, handler)

    async def openai_error(request: Request, exc: Exception):
        assert isinstance(exc, OpenAIError)
        return exc.response()

    app.add_exception_handler(OpenAIError, openai_error)
