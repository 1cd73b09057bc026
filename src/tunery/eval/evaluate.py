"""Evaluate a base model, a tuned model, or both side by side, on a JSONL test file.

Two kinds of numbers: loss and perplexity on the completion (assistant) tokens, masked exactly
as in training; and, for prompt/completion and chat data, metrics of greedy (by default)
generations against the references. With a LoRA run both columns come from one loaded model:
the base column runs with the adapter disabled.

RFT rows (OpenAI's reinforcement format: prompts and the fields a grader reads) are scored by a
grader: each column answers every prompt (greedy by default), and grader_score is the mean of the
grader's scores, beside each named grader's mean (grader_<name>) and the share the grader failed
on (grader_failed).

Preference rows (OpenAI's DPO format) are scored by the log-probabilities of their two answers
instead: preference_rate is the fraction of rows where the model gives the preferred answer a
higher summed log-probability than the non-preferred one (each given the conversation rendered
with the chat template up to the assistant's turn), logp_margin the mean difference of the two.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunery.eval.metrics import generation_metrics
from tunery.eval.scoring import completion_loss, generate_all, preference_metrics

if TYPE_CHECKING:
    from tunery.data.jsonl import Format

Column = tuple[str, Callable[[], contextlib.AbstractContextManager]]


def prompts_and_references(rows: list[dict], fmt: str, tokenizer) -> tuple[list[list[int]], list[str]]:
    """Prompt token ids (as training tokenized prompts) and reference texts, for generation.
    Text rows have neither: they are scored by loss only."""
    from tunery.data.tokenize import chat_messages, prompt_ids

    if fmt == "prompt_completion":
        return [prompt_ids(tokenizer, r["prompt"]) for r in rows], [r["completion"].strip() for r in rows]
    if fmt == "messages":
        prompts, refs = [], []
        for r in rows:
            msgs = r["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            text = tokenizer.apply_chat_template(chat_messages(msgs[:last]), tokenize=False,
                                                 add_generation_prompt=True)
            prompts.append(list(tokenizer(text, add_special_tokens=False).input_ids))
            refs.append(msgs[last]["content"].strip())
        return prompts, refs
    return [], []


def evaluate_model(model, tokenizer, rows: list[dict], fmt: Format, *, columns: list[Column], params=None,
                   batch_size: int = 8, max_new_tokens: int | None = None, max_length: int = 2048,
                   n_examples: int = 5, progress: bool = True, console: Console | None = None,
                   grader=None, response_format: dict | None = None) -> dict[str, Any]:
    """Score `model` under each column's context (e.g. base = adapter disabled, tuned = as is).

    Generation stops at EOS, at the given stop sequences, and — when no reference contains a
    newline — at the first newline, so a base model that rambles on is judged on its first line.
    RFT rows need `grader` (tunery.graders; `response_format`: the JSON schema their prompts show).
    """
    from tunery.data import tokenize_rows
    from tunery.infer.generation import SamplingParams

    params = params or SamplingParams(temperature=0)
    if fmt == "preference":
        return _evaluate_preferences(model, tokenizer, rows, columns=columns, batch_size=batch_size,
                                     max_length=max_length, n_examples=n_examples, progress=progress, console=console)
    if fmt == "rft":
        return _evaluate_rft(model, tokenizer, rows, columns=columns, grader=grader, params=params,
                             batch_size=batch_size, max_new_tokens=max_new_tokens, n_examples=n_examples,
                             progress=progress, console=console, response_format=response_format)
    started = time.time()
    examples = tokenize_rows(rows, fmt, tokenizer, max_length=max_length)
    prompts, refs = prompts_and_references(rows, fmt, tokenizer)
    stops = list(params.stops)
    if refs and not any("\n" in r for r in refs) and "\n" not in stops:
        stops.append("\n")
    if max_new_tokens is None:
        longest = max((len(tokenizer(r, add_special_tokens=False).input_ids) for r in refs), default=0)
        max_new_tokens = min(params.max_new_tokens if params.max_new_tokens else 256, longest + 16) or 32
    was_training = model.training
    model.eval()
    metrics: dict[str, dict[str, float]] = {}
    outputs: dict[str, list[str]] = {}
    work = len(columns) * (len(examples) + len(prompts))
    with _progress(progress, console, work) as advance:
        for name, context in columns:
            with context():
                loss = completion_loss(model, tokenizer, examples, batch_size=batch_size, advance=advance)
                m = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
                if prompts:
                    outs = generate_all(model, tokenizer, prompts, params=params, max_new_tokens=max_new_tokens,
                                        stops=stops, batch_size=batch_size, advance=advance)
                    outputs[name] = outs
                    m.update(generation_metrics(outs, refs))
            metrics[name] = m
    if was_training:
        model.train()
    shown = []
    for i in range(min(n_examples, len(refs))):
        ex = {"prompt": _prompt_text(rows[i], fmt), "reference": refs[i]}
        ex.update({name: outs[i] for name, outs in outputs.items()})
        shown.append(ex)
    return {
        "rows": len(rows),
        "format": fmt,
        "columns": [name for name, _ in columns],
        "metrics": metrics,
        "examples": shown,
        "settings": {"max_new_tokens": max_new_tokens, "temperature": params.temperature, "stops": stops,
                     "batch_size": batch_size},
        "seconds": round(time.time() - started, 1),
    }


def _evaluate_preferences(model, tokenizer, rows: list[dict], *, columns: list[Column], batch_size: int,
                          max_length: int, n_examples: int, progress: bool, console: Console | None) -> dict[str, Any]:
    """The report of `evaluate_model` for preference rows: preference_rate and logp_margin per column;
    the examples show each column's margin (log p(preferred) − log p(non-preferred)) on a row."""
    from tunery.data import preference_examples

    started = time.time()
    pairs = preference_examples(rows, tokenizer, max_length=max_length)
    was_training = model.training
    model.eval()
    metrics: dict[str, dict[str, float]] = {}
    margins: dict[str, list[float]] = {}
    with _progress(progress, console, len(columns) * 2 * len(pairs)) as advance:
        for name, context in columns:
            with context():
                metrics[name], margins[name] = preference_metrics(model, tokenizer, pairs, batch_size=batch_size,
                                                                  advance=advance)
    if was_training:
        model.train()
    shown = []
    for i in range(min(n_examples, len(rows))):
        ex = {"prompt": _prompt_text(rows[i], "preference"), "reference": rows[i]["preferred_output"][0]["content"],
              "non_preferred": rows[i]["non_preferred_output"][0]["content"]}
        ex.update({name: f"margin {m[i]:+.2f}" for name, m in margins.items()})
        shown.append(ex)
    return {
        "rows": len(rows),
        "format": "preference",
        "columns": [name for name, _ in columns],
        "metrics": metrics,
        "examples": shown,
        "settings": {"batch_size": batch_size, "max_length": max_length},
        "seconds": round(time.time() - started, 1),
    }


def _evaluate_rft(model, tokenizer, rows: list[dict], *, columns: list[Column], grader, params, batch_size: int,
                  max_new_tokens: int | None, n_examples: int, progress: bool, console: Console | None,
                  response_format: dict | None) -> dict[str, Any]:
    """The report of `evaluate_model` for RFT rows: each column's answers scored by `grader`."""
    from tunery.data import rft_prompt
    from tunery.errors import TuneryError
    from tunery.graders import grade_many

    if grader is None:
        raise TuneryError("RFT rows are scored by a grader: pass --grader grader.json (a GRPO run's own grader is "
                          "used when the weights are one)")
    started = time.time()
    texts = [tokenizer.apply_chat_template(rft_prompt(r, response_format), tokenize=False, add_generation_prompt=True)
             for r in rows]
    prompts = [list(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    max_new_tokens = max_new_tokens or params.max_new_tokens or 256
    was_training = model.training
    model.eval()
    metrics: dict[str, dict[str, float]] = {}
    outputs: dict[str, list[str]] = {}
    with _progress(progress, console, 2 * len(columns) * len(prompts)) as advance:
        for name, context in columns:
            with context():
                outs = generate_all(model, tokenizer, prompts, params=params, max_new_tokens=max_new_tokens,
                                    stops=list(params.stops), batch_size=batch_size, advance=advance)
            outputs[name] = outs
            graded = grade_many(grader, list(zip(outs, rows, strict=True)), want_json=response_format is not None)
            advance(len(graded))
            m = {"grader_score": sum(o.reward for o in graded) / max(1, len(graded)),
                 "grader_failed": sum(not o.ok for o in graded) / max(1, len(graded))}
            named = sorted({k for o in graded for k in o.scores})
            if named != [grader.name]:
                for key in named:
                    values = [o.scores[key] for o in graded if key in o.scores]
                    m[f"grader_{key}"] = sum(values) / len(values)
            metrics[name] = m
    if was_training:
        model.train()
    shown = []
    for i in range(min(n_examples, len(rows))):
        ex = {"prompt": _prompt_text(rows[i], "rft"), "reference": ""}
        ex.update({name: outs[i] for name, outs in outputs.items()})
        shown.append(ex)
    return {
        "rows": len(rows),
        "format": "rft",
        "columns": [name for name, _ in columns],
        "metrics": metrics,
        "examples": shown,
        "grader": grader.name,
        "settings": {"max_new_tokens": max_new_tokens, "temperature": params.temperature, "batch_size": batch_size},
        "seconds": round(time.time() - started, 1),
    }


def evaluate(test_data: str | Path, *, weights: str | Path | None = None, base: str | None = None,
             compare: bool = False, params=None, batch_size: int = 8, max_new_tokens: int | None = None,
             n_examples: int = 5, output_dir: str | Path | None = None, progress: bool = True,
             console: Console | None = None, grader: dict | None = None,
             forgetting: bool | None = None) -> dict[str, Any]:
    """Evaluate `weights` (a run, archive or adapter), a `base`, or both (`compare`), on `test_data`;
    write eval.json / eval.md (into `output_dir`, default the run directory) and return the report.
    RFT rows are scored by `grader` (OpenAI's grader JSON), by default the one a GRPO run trained with.
    `forgetting` (default: on for tuned weights over an instruct base) adds what tuning cost the
    model on general text and instructions, base against tuned (tunery.eval.forgetting)."""
    from tunery.data import fetch, read_jsonl
    from tunery.errors import TuneryError
    from tunery.eval import forgetting as cost
    from tunery.eval.report import write_report
    from tunery.infer.weights import resolve_weights
    from tunery.models.load import load_model, load_tokenizer, pick_device
    from tunery.models.registry import DEFAULT_BASE
    from tunery.models.resolve import resolve_base
    from tunery.settings import get_settings

    settings = get_settings()
    settings.download_dir.mkdir(parents=True, exist_ok=True)
    ds = read_jsonl(fetch(str(test_data), settings.download_dir, storage=True, storage_options=settings.storage_options),
                    name=str(test_data))
    w = resolve_weights(weights) if weights is not None else None
    base_name = base or (w.base if w else None) or DEFAULT_BASE
    scoring: dict[str, Any] = {}
    if ds.format == "rft":
        scoring = _rft_scoring(grader, weights)
    resolved = resolve_base(base_name, settings)
    if forgetting and w is None:
        raise TuneryError("the forgetting measure compares tuned weights with their base: pass --weights")
    columns: list[Column] = []
    if w is None:
        model, tokenizer = load_model(resolved), load_tokenizer(resolved)
        columns.append(("base", contextlib.nullcontext))
    elif w.kind == "full":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # cast: transformers wraps `to` in functools.wraps, whose type mypy does not bind as a method.
        model = cast(Any, AutoModelForCausalLM.from_pretrained(w.path)).to(pick_device())
        tokenizer = AutoTokenizer.from_pretrained(w.tokenizer or w.path)
        columns.append(("tuned", contextlib.nullcontext))
    else:
        from peft import PeftModel
        from transformers import AutoTokenizer

        model = PeftModel.from_pretrained(load_model(resolved), str(w.path))
        tokenizer = AutoTokenizer.from_pretrained(w.tokenizer) if w.tokenizer else load_tokenizer(resolved)
        if compare:
            columns.append(("base", model.disable_adapter))
        columns.append(("tuned", contextlib.nullcontext))
    # Decided (or refused) from the tokenizer the instructions are asked in, before any scoring.
    if forgetting is None:
        forgetting = w is not None and cost.is_instruct(tokenizer)
    elif forgetting and not cost.is_instruct(tokenizer):
        raise TuneryError(f"the forgetting measure asks {base_name} general instructions in its chat template, "
                          "and its tokenizer has none: leave it off (--no-forgetting)")
    # A full fine-tune's base is a second model, loaded once for both uses; in the tuned model's chat
    # template (the one it was trained with).
    base_side = None
    if w is not None and w.kind == "full" and (compare or forgetting):
        base_side = load_model(resolved), load_tokenizer(resolved, getattr(tokenizer, "chat_template", None))
    if base_side is not None and compare:
        report_base = evaluate_model(*base_side, ds.rows, ds.format, columns=[("base", contextlib.nullcontext)],
                                     params=params, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     n_examples=n_examples, progress=progress, console=console, **scoring)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    report = evaluate_model(model, tokenizer, ds.rows, ds.format, columns=columns, params=params,
                            batch_size=batch_size, max_new_tokens=max_new_tokens, n_examples=n_examples,
                            progress=progress, console=console, **scoring)
    if base_side is not None and compare:
        report = merge_columns(report_base, report)
    if forgetting:
        sides: list[cost.Side] = [("tuned", model, tokenizer, contextlib.nullcontext)]
        if base_side is not None:
            sides.insert(0, ("base", *base_side, contextlib.nullcontext))
        else:
            sides.insert(0, ("base", model, tokenizer, model.disable_adapter))
        with _progress(progress, console, cost.work(len(sides))) as advance:
            report["forgetting"] = cost.forgetting(sides, batch_size=batch_size, advance=advance)
    report.update({"test_data": str(test_data), "test_sha256": ds.sha256, "base": base_name,
                   "weights": str(weights) if weights is not None else None})
    target = Path(output_dir) if output_dir else _run_of(weights)
    if target is not None:
        write_report(report, target)
    return report


def _rft_scoring(grader: dict | None, weights: str | Path | None) -> dict[str, Any]:
    """The grader (and response_format) RFT rows are scored with: `grader`, else the GRPO run's own.
    Checked like a training's (its python source loaded in the sandbox)."""
    import json

    from tunery.artifacts.run import MANIFEST
    from tunery.errors import SpecError, TuneryError
    from tunery.graders import GraderError, load_grader

    inputs: dict[str, Any] = {}
    run = _run_of(weights)
    if run is not None and run.exists(MANIFEST):
        inputs = run.read_manifest().get("inputs") or {}
    if grader is None and inputs.get("grader"):
        grader = json.loads(inputs["grader"])
    if grader is None:
        raise TuneryError("the test data holds RFT prompts, which a grader scores: pass --grader grader.json")
    if set(grader) == {"grader"}:
        grader = grader["grader"]
    try:
        loaded = load_grader(grader)
    except GraderError as exc:
        raise SpecError(f"invalid grader: {exc}") from None
    schema = inputs.get("response_format")
    return {"grader": loaded, "response_format": json.loads(schema) if schema else None}


def merge_columns(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """One report from two single-column reports on the same rows (base first)."""
    merged = dict(second)
    merged["columns"] = first["columns"] + second["columns"]
    merged["metrics"] = {**first["metrics"], **second["metrics"]}
    merged["examples"] = [{**a, **b} for a, b in zip(first["examples"], second["examples"], strict=True)]
    merged["seconds"] = round(first["seconds"] + second["seconds"], 1)
    return merged


def _run_of(weights: str | Path | None):
    """The run `weights` names (a run's URL or folder, or its adapter/ or model/), or None."""
    from tunery.artifacts.run import MANIFEST, WEIGHTS, Run, is_url
    from tunery.settings import get_settings

    if weights is None:
        return None
    if is_url(weights):
        return get_settings().run(str(weights))
    p = Path(weights)
    if p.is_dir() and p.name in WEIGHTS:
        p = p.parent
    return Run(p) if p.is_dir() and (p / MANIFEST).is_file() else None


def _prompt_text(row: dict, fmt: str) -> str:
    if fmt == "prompt_completion":
        return row["prompt"]
    if fmt == "messages":
        return "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"][:-1])
    if fmt == "preference":
        return "\n".join(f"{m['role']}: {m['content']}" for m in row["input"]["messages"])
    if fmt == "rft":
        return "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"])
    return row.get("text", "")


@contextlib.contextmanager
def _progress(enabled: bool, console: Console | None, total: int) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    bar = Progress(TextColumn("[bold]eval[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), console=console or Console(stderr=True))
    task = bar.add_task("eval", total=total)
    with bar:
        yield lambda n: bar.advance(task, n)
