"""The service's graders: checked before anything uses them, and run on one sample (OpenAI's graders
API, `/openai/v1/fine_tuning/alpha/graders/validate` and `/run`). A score_model grader's judge is a
model this server serves, run on the same serving engines and slots as the predictions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunery.graders import GraderError, Judge, Limits, Outcome, grade, load_grader
from tunery.service import predictions
from tunery.service.errors import Invalid, ServiceError
from tunery.settings import Settings

#: A judge answers in a few tokens ("0.8", or {"steps": [...], "result": 0.8}).
JUDGE_MAX_TOKENS = 128


def grader_limits(settings: Settings) -> Limits:
    return Limits(seconds=settings.grader_seconds, memory_bytes=settings.grader_memory_mb << 20)


def check(settings: Settings, obj: Any, *, has_model: Callable[[str], bool] | None = None, field: str = "grader",
          training: bool = False):
    """The grader `obj` describes, checked (its python source loaded in the sandbox; with `training`,
    no score_model grader in it); Invalid naming the field at fault otherwise."""
    try:
        return load_grader(obj, limits=grader_limits(settings), has_model=has_model, field=field, training=training)
    except GraderError as exc:
        raise Invalid(exc.reason, field=exc.field, title="Invalid grader") from None


def served_judge(runner, settings: Settings, resolve: Callable[[str], tuple[Any, Any]],
                 owner: str | None = None) -> Judge:
    """A judge on this server's engines, counted as `owner`'s: `resolve(name)` gives the (model,
    version) a score_model grader's `model` names. Greedy unless the grader's sampling_params say
    otherwise."""
    from tunery.chat_templates import generation_prompt
    from tunery.infer.generation import SamplingParams

    def judge(name: str, messages: list[dict], sampling: dict) -> tuple[str, dict]:
        _, version = resolve(name)
        [slot] = predictions.take_slots(runner, owner)
        try:
            tokenizer = predictions.tokenizer_for(settings, version)
            if not getattr(tokenizer, "chat_template", None):
                raise Invalid(f"{name} has no chat template, so it cannot judge messages")
            params = SamplingParams(max_new_tokens=sampling.get("max_completions_tokens") or JUDGE_MAX_TOKENS,
                                    temperature=sampling.get("temperature", 0.0), top_p=sampling.get("top_p", 1.0),
                                    top_k=0, seed=sampling.get("seed"))
            generation = predictions.generate(runner, settings, version, generation_prompt(tokenizer, messages),
                                              params, owner)
            text = generation.text()
        finally:
            slot.release()
        m = generation.metrics
        return text, {"prompt_tokens": int(m.get("input_token_count") or 0),
                      "completion_tokens": int(m.get("output_token_count") or 0)}

    return judge


def run(settings: Settings, grader, model_sample: str, item: Any, *, judge: Judge | None) -> Outcome:
    """Score `model_sample` for `item`: the reward, each grader's score, and OpenAI's error flags."""
    if item is not None and not isinstance(item, dict):
        raise Invalid("item must be an object (the dataset row the grader reads as item.*)", field="item")
    return grade(grader, model_sample, item or {}, judge=judge, limits=grader_limits(settings))


__all__ = ["ServiceError", "check", "grader_limits", "run", "served_judge"]
