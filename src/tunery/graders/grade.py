"""Scoring one sampled answer with a grader, as OpenAI's graders do, and checking a grader before use.

`grade(grader, output_text, item)` gives an Outcome: the reward (0 when anything failed), each
named grader's score, OpenAI's error flags and a readable message per failure. A failure never
raises: a sample that cannot be graded scores 0 and says why, so one bad sample never stops a
training. `check_grader` raises GraderError before any work is done."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tunery.graders import formula, templates
from tunery.graders.sandbox import Limits, SandboxUnavailable, run_python
from tunery.graders.similarity import COSINE_REFUSAL, similarity
from tunery.graders.spec import (
    GraderError,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
    walk,
)

#: OpenAI's metadata.errors flags, all false when a sample was graded.
ERROR_FLAGS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
               "model_grader_refusal_error", "model_grader_server_error", "other_error",
               "python_grader_runtime_error", "python_grader_server_error", "sample_parse_error",
               "truncated_observation_error", "unresponsive_reward_error")
SAMPLE_FIELDS = ("output_text", "output_json", "output_tools")

#: A judge: (model, messages, sampling params) -> (its answer, token usage {prompt_tokens, completion_tokens}).
Judge = Callable[[str, list[dict], dict], tuple[str, dict]]


@dataclass
class Outcome:
    reward: float
    scores: dict[str, float] = field(default_factory=dict)  # each grader's score, by name (a multi's by key)
    errors: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(ERROR_FLAGS, False))
    messages: list[str] = field(default_factory=list)  # "grader.graders.code: ran past its time limit of 10 s"
    details: dict[str, str] = field(default_factory=dict)  # python_grader_runtime_error_details and the like
    token_usage: dict[str, dict[str, int]] = field(default_factory=dict)  # per judge model
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.messages


class _Failed(Exception):
    def __init__(self, flag: str, message: str, details: str | None = None):
        super().__init__(message)
        self.flag, self.message, self.details = flag, message, details


# ----------------------------------------------------------------------------------------------- checks


def check_grader(grader, *, limits: Limits = Limits(), has_model: Callable[[str], bool] | None = None,
                 where: str = "grader") -> None:
    """GraderError (with the field) for what parsing cannot see: a template naming anything but
    item.… and sample.output_text/output_json/output_tools, a formula naming a grader that is not
    there, a python source that does not compile or defines no grade (loaded in the sandbox),
    cosine similarity (no embedding model here), a judge model this server does not serve."""
    for path, g in walk(grader, where):
        for name, template in _templates(g):
            try:
                refs = templates.references(template)
            except templates.TemplateError as exc:
                raise GraderError(str(exc), field=f"{path}.{name}") from None
            for namespace, steps in refs:
                if namespace == "sample" and (not steps or steps[0] not in SAMPLE_FIELDS):
                    raise GraderError(f"sample has {', '.join(SAMPLE_FIELDS)}, not {steps[0] if steps else 'itself'!r}",
                                      field=f"{path}.{name}")
        if isinstance(g, MultiGrader):
            try:
                formula.parse(g.calculate_output, set(g.graders))
            except formula.FormulaError as exc:
                raise GraderError(str(exc), field=f"{path}.calculate_output") from None
        elif isinstance(g, TextSimilarityGrader) and g.evaluation_metric == "cosine":
            raise GraderError(COSINE_REFUSAL, field=f"{path}.evaluation_metric")
        elif isinstance(g, ScoreModelGrader) and has_model is not None and not has_model(g.model):
            raise GraderError(f"no model {g.model!r} is served here: name a base model or an ft: model of "
                              "this server", field=f"{path}.model")
        elif isinstance(g, PythonGrader):
            try:
                result = run_python(g.source, {}, {}, limits, check_only=True)
            except SandboxUnavailable as exc:
                raise GraderError(str(exc), field=f"{path}.source") from None
            if result.error:
                raise GraderError(f"python grader: {result.error}", field=f"{path}.source")


def _templates(g) -> Iterable[tuple[str, str]]:
    if isinstance(g, (StringCheckGrader, TextSimilarityGrader)):
        yield "input", g.input
        yield "reference", g.reference
    elif isinstance(g, ScoreModelGrader):
        for i, m in enumerate(g.input):
            yield f"input.{i}.content", m.content


def item_problems(grader, item: dict, *, where: str = "grader") -> list[str]:
    """What `item` (one data row) lacks that the grader's templates read, one reason per template."""
    problems = []
    for path, g in walk(grader, where):
        for name, template in _templates(g):
            for namespace, steps in templates.references(template):
                if namespace == "item":
                    try:
                        templates.lookup("item", steps, {"item": item})
                    except templates.TemplateError as exc:
                        problems.append(f"{path}.{name} reads {{{{ item.{_dotted(steps)} }}}}, but {exc}")
    return problems


def _dotted(steps: tuple) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")


# -------------------------------------------------------------------------------------------- grading


def grade(grader, output_text: str, item: dict | None = None, *, judge: Judge | None = None,
          limits: Limits = Limits(), want_json: bool = False, where: str = "grader") -> Outcome:
    """Score `output_text` (one sampled answer) for `item` (its data row) with `grader`."""
    started = time.monotonic()
    values = {"item": item or {}, "sample": templates.sample_values(output_text, want_json=want_json)}
    outcome = Outcome(reward=0.0)
    try:
        outcome.reward = _score(grader, values, outcome, judge, limits, where)
        if not isinstance(grader, MultiGrader):
            outcome.scores[grader.name] = outcome.reward
    except _Failed as exc:
        outcome.reward = 0.0
        outcome.errors[exc.flag] = True
        outcome.messages.append(exc.message)
        if exc.details:
            outcome.details[exc.flag + "_details"] = exc.details
    if outcome.messages:
        outcome.reward = 0.0
    outcome.seconds = time.monotonic() - started
    return outcome


def grade_many(grader, samples: list[tuple[str, dict]], *, judge: Judge | None = None, limits: Limits = Limits(),
               want_json: bool = False, threads: int = 4) -> list[Outcome]:
    """`grade` for each (output_text, item), python graders' sandboxes running `threads` at a time."""
    if threads <= 1 or len(samples) <= 1:
        return [grade(grader, text, item, judge=judge, limits=limits, want_json=want_json) for text, item in samples]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grader") as pool:
        return list(pool.map(lambda s: grade(grader, s[0], s[1], judge=judge, limits=limits, want_json=want_json),
                             samples))


def _score(g, values: dict, outcome: Outcome, judge: Judge | None, limits: Limits, where: str) -> float:
    if isinstance(g, MultiGrader):
        scores: dict[str, float] = {}
        for key, sub in g.graders.items():
            try:
                scores[key] = _score(sub, values, outcome, judge, limits, f"{where}.graders.{key}")
            except _Failed as exc:  # the others are still scored and shown; the reward is 0
                outcome.errors[exc.flag] = True
                outcome.messages.append(exc.message)
                if exc.details:
                    outcome.details[exc.flag + "_details"] = exc.details
                scores[key] = 0.0
            outcome.scores[key] = scores[key]
        if outcome.messages:
            return 0.0
        try:
            value = formula.evaluate(formula.parse(g.calculate_output, set(g.graders)), scores)
        except formula.FormulaError as exc:
            raise _Failed("formula_parse_error", f"{where}.calculate_output: {exc}") from None
        if not math.isfinite(value):
            raise _Failed("formula_parse_error", f"{where}.calculate_output gave {value}")
        return value
    return _leaf(g, values, judge, limits, where, outcome)


def _text(template: str, values: dict, where: str) -> str:
    try:
        return templates.render(template, values)
    except templates.TemplateError as exc:
        flag = "sample_parse_error" if str(exc).startswith("sample") else "invalid_variable_error"
        if flag == "sample_parse_error" and values["sample"]["output_json"] is None:
            raise _Failed(flag, f"{where}: the sample is not JSON, so sample.output_json has no fields") from None
        raise _Failed(flag, f"{where}: {exc}") from None


def _leaf(g, values: dict, judge: Judge | None, limits: Limits, where: str, outcome: Outcome) -> float:
    if isinstance(g, StringCheckGrader):
        got, ref = _text(g.input, values, f"{where}.input"), _text(g.reference, values, f"{where}.reference")
        hit = {"eq": got == ref, "ne": got != ref, "like": ref in got, "ilike": ref.lower() in got.lower()}
        return 1.0 if hit[g.operation] else 0.0
    if isinstance(g, TextSimilarityGrader):
        got, ref = _text(g.input, values, f"{where}.input"), _text(g.reference, values, f"{where}.reference")
        try:
            return similarity(g.evaluation_metric, got, ref)
        except ValueError as exc:
            raise _Failed("other_error", f"{where}: {exc}") from None
    if isinstance(g, PythonGrader):
        try:
            result = run_python(g.source, values["sample"], values["item"], limits)
        except SandboxUnavailable as exc:
            raise _Failed("python_grader_server_error", f"{where}: {exc}") from None
        if result.error:
            raise _Failed("python_grader_runtime_error", f"{where}: python grader {result.error}",
                          (result.error + ("\n" + result.output if result.output else ""))[:2000])
        assert result.score is not None
        if not 0.0 <= result.score <= 1.0:
            raise _Failed("python_grader_runtime_error",
                          f"{where}: python grader returned {result.score:g}, outside [0, 1]")
        return result.score
    if isinstance(g, ScoreModelGrader):
        return _judge(g, values, judge, where, outcome)
    raise _Failed("other_error", f"{where}: cannot grade a {type(g).__name__}")


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def judge_instruction(low: float, high: float) -> str:
    return (f"You are a grader. Reply with only a number from {low:g} to {high:g}: the score. "
            'You may instead reply with JSON: {"steps": [your reasoning], "result": the score}.')


def _judge(g: ScoreModelGrader, values: dict, judge: Judge | None, where: str, outcome: Outcome) -> float:
    if judge is None:
        raise _Failed("model_grader_server_error", f"{where}: no model server is at hand to run {g.model!r}")
    messages = [{"role": "system", "content": judge_instruction(*g.range)}]
    messages += [{"role": "system" if m.role == "developer" else m.role,
                  "content": _text(m.content, values, f"{where}.input.{i}.content")} for i, m in enumerate(g.input)]
    sampling = g.sampling_params.model_dump(exclude_none=True) if g.sampling_params else {}
    try:
        answer, usage = judge(g.model, messages, sampling)
    except Exception as exc:  # noqa: BLE001 - the judge's failure is the sample's, not the run's
        raise _Failed("model_grader_server_error", f"{where}: {g.model} failed: {exc}",
                      f"{type(exc).__name__}: {exc}"[:2000]) from None
    used = outcome.token_usage.setdefault(g.model, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    for key in ("prompt_tokens", "completion_tokens"):
        used[key] += int(usage.get(key, 0))
    used["total_tokens"] = used["prompt_tokens"] + used["completion_tokens"]
    value = _parse_score(answer)
    if value is None:
        raise _Failed("model_grader_parse_error", f"{where}: {g.model} answered {answer.strip()[:120]!r}, not a score")
    if not g.range[0] <= value <= g.range[1]:
        raise _Failed("model_grader_parse_error",
                      f"{where}: {g.model} answered {value:g}, outside its range [{g.range[0]:g}, {g.range[1]:g}]")
    return value


def _parse_score(answer: str) -> float | None:
    text = answer.strip()
    try:
        data: Any = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("result"), (int, float)) and not isinstance(data["result"], bool):
        return float(data["result"])
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    match = _NUMBER.search(text)
    return float(match.group(0)) if match else None
