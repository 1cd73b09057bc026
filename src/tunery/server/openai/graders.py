"""OpenAI's graders API under /openai/v1: `POST /fine_tuning/alpha/graders/validate` answers the
grader back when it can run here (else a 400 naming the field), `POST /fine_tuning/alpha/graders/run`
scores one `model_sample` for one `item` as a reinforcement fine-tuning job would, with OpenAI's
response: reward, metadata (name, type, errors, execution_time, scores, token_usage,
sampled_model_name), sub_rewards and model_grader_token_usage_per_model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from tunery.graders import MultiGrader
from tunery.server.deps import Owner, RunnerDep, SettingsDep, StoreDep
from tunery.server.openai.errors import OpenAIError
from tunery.server.openai.names import resolve_model
from tunery.service import graders
from tunery.service.errors import ServiceError

router = APIRouter(prefix="/openai/v1/fine_tuning/alpha/graders", tags=["openai"])


class ValidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: Any


class RunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: Any
    model_sample: str
    item: Any = None


def _has_model(store, owner: str):
    def has(name: str) -> bool:
        try:
            resolve_model(store, owner, name)
            return True
        except OpenAIError:
            return False

    return has


def _checked(store, settings, owner: str, obj: Any):
    try:
        return graders.check(settings, obj, has_model=_has_model(store, owner))
    except ServiceError as exc:
        raise OpenAIError(400, f"Invalid grader: {exc.message}", param=exc.field,
                          code="invalid_grader") from None


@router.post("/validate")
def validate(body: ValidateBody, owner: Owner, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    _checked(store, settings, owner, body.grader)
    return {"grader": body.grader}


@router.post("/run")
def run(body: RunBody, owner: Owner, store: StoreDep, settings: SettingsDep, runner: RunnerDep) -> dict[str, Any]:
    grader = _checked(store, settings, owner, body.grader)
    judge = graders.served_judge(runner, settings, lambda name: resolve_model(store, owner, name, settings), owner)
    try:
        out = graders.run(settings, grader, body.model_sample, body.item, judge=judge)
    except ServiceError as exc:
        raise OpenAIError(400, exc.message, param=exc.field) from None
    errors: dict[str, Any] = dict(out.errors)
    errors.setdefault("model_grader_server_error_details", None)
    errors.setdefault("python_grader_runtime_error_details", None)
    errors.setdefault("python_grader_server_error_type", None)
    errors.update(out.details)
    sub = dict(out.scores) if isinstance(grader, MultiGrader) else {}
    usage = {"prompt_tokens": sum(u["prompt_tokens"] for u in out.token_usage.values()),
             "completion_tokens": sum(u["completion_tokens"] for u in out.token_usage.values())}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "reward": out.reward,
        "metadata": {"name": grader.name, "type": grader.type, "errors": errors,
                     "execution_time": round(out.seconds, 4), "scores": out.scores,
                     "token_usage": usage if out.token_usage else None, "sampled_model_name": None,
                     "messages": out.messages},
        "sub_rewards": sub,
        "model_grader_token_usage_per_model": out.token_usage,
    }
