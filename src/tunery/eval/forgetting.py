"""What tuning cost the model elsewhere: forgetting, measured base against tuned on data that is
no task's (bundled in tunery.samples.general, real text written by people; see its README).

Three figures per model:

- ``general_text_loss``: mean cross-entropy per token on 48 paragraphs of web text
  (OpenWebText). A tuned model that forgot how language goes in general loses here.
- ``base_answer_loss``: mean cross-entropy per token of the *base's own* greedy answers to 24
  general instructions (MT-Bench's first turns), each given its instruction in the chat template.
  The base is at its lowest here by construction; how far the tuned model rises is how far it
  moved away from what the instruct model would have said.
- ``answer_agreement``: the mean over instructions of the chrF of the tuned model's greedy answer
  against the base's (character n-grams, so code and any script count; an answer the same as the
  base's scores 1, so 1 = it answers as the base did; only for tuned models).

The base's answers are made once (`base_reference`) and every tuned model is measured against
them (`cost`); `forgetting` does both for an evaluation's columns. On by default in `tunery eval`
where the base is an instruct model (its tokenizer has a chat template).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENERAL = Path(__file__).resolve().parents[1] / "samples" / "general"
MAX_NEW_TOKENS = 64  # per instruction answer: enough to show what a model does with it
MAX_TEXT_TOKENS = 256  # per general-text paragraph
# One column of an evaluation: name, model, tokenizer, and the context it runs in (an adapter off).
Side = tuple[str, Any, Any, Callable[[], contextlib.AbstractContextManager]]


@functools.cache
def general_text() -> list[dict]:
    """The bundled paragraphs (read once; not to be changed by callers)."""
    return _read(GENERAL / "text.jsonl")


@functools.cache
def instructions() -> list[dict]:
    """The bundled instructions (read once; not to be changed by callers)."""
    return _read(GENERAL / "instructions.jsonl")


def is_instruct(tokenizer) -> bool:
    """An instruct (chat) model: the forgetting measure is on by default for it."""
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass
class BaseReference:
    """The base model's side of the measure: its figures, and its answers the others are held to."""

    instructions: list[str]
    answers: list[str]
    general_text_loss: float
    base_answer_loss: float

    def metrics(self) -> dict[str, float]:
        return {"general_text_loss": self.general_text_loss, "base_answer_loss": self.base_answer_loss}


def base_reference(model, tokenizer, *, batch_size: int = 8, max_new_tokens: int = MAX_NEW_TOKENS,
                   advance: Callable[[int], None] = lambda n: None) -> BaseReference:
    """Score the base (`model` as it is) and keep its greedy answers to the instructions."""
    rows = instructions()
    answers = _answers(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens, advance=advance)
    return BaseReference(
        instructions=[r["messages"][-1]["content"] for r in rows], answers=answers,
        general_text_loss=_general_loss(model, tokenizer, batch_size=batch_size, advance=advance),
        base_answer_loss=_answer_loss(model, tokenizer, rows, answers, batch_size=batch_size, advance=advance))


def cost(model, tokenizer, reference: BaseReference, *, batch_size: int = 8, max_new_tokens: int = MAX_NEW_TOKENS,
         advance: Callable[[int], None] = lambda n: None) -> dict[str, float]:
    """A tuned model's figures (`model` as it is), held to the base's `reference`."""
    import sacrebleu

    rows = instructions()
    answers = _answers(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens, advance=advance)
    return {
        "general_text_loss": _general_loss(model, tokenizer, batch_size=batch_size, advance=advance),
        "base_answer_loss": _answer_loss(model, tokenizer, rows, reference.answers, batch_size=batch_size,
                                         advance=advance),
        "answer_agreement": sum(1.0 if a == b else sacrebleu.sentence_chrf(a, [b]).score / 100
                                for a, b in zip(answers, reference.answers, strict=True)) / len(answers),
    }


def work(columns: int) -> int:
    """Progress units `forgetting` advances by for that many columns."""
    return columns * (len(general_text()) + 2 * len(instructions()))


def forgetting(sides: list[Side], *,
               batch_size: int = 8, advance: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """The measure for an evaluation's columns: `sides` is (name, model, tokenizer, context) per
    column, the base first. Returns {"metrics": {column: figures}, "rows": ..., "seconds": ...}."""
    started = time.time()
    (base_name, base_model, base_tokenizer, base_context), *tuned = sides
    with base_context():
        reference = base_reference(base_model, base_tokenizer, batch_size=batch_size, advance=advance)
    metrics: dict[str, dict[str, float]] = {base_name: reference.metrics()}
    for name, model, tokenizer, context in tuned:
        with context():
            metrics[name] = cost(model, tokenizer, reference, batch_size=batch_size, advance=advance)
    return {"metrics": metrics, "general_texts": len(general_text()), "instructions": len(reference.instructions),
            "max_new_tokens": MAX_NEW_TOKENS, "seconds": round(time.time() - started, 1)}


def summary_line(result: dict[str, Any]) -> str | None:
    """"what tuning cost: ..." from the base's and the last column's figures, or None without both."""
    names = list(result["metrics"])
    if len(names) < 2:
        return None
    base, tuned = result["metrics"][names[0]], result["metrics"][names[-1]]
    change = (tuned["general_text_loss"] - base["general_text_loss"]) / base["general_text_loss"]
    return (f"what tuning cost: general-text loss {base['general_text_loss']:.3f} → {tuned['general_text_loss']:.3f} "
            f"({change:+.1%}); loss on the base's own answers {base['base_answer_loss']:.3f} → "
            f"{tuned['base_answer_loss']:.3f}; answers agree with the base's {tuned['answer_agreement']:.2f} "
            f"(chrF, 1 = unchanged; {result['general_texts']} texts, {result['instructions']} instructions)")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _answers(model, tokenizer, rows: list[dict], *, batch_size: int, max_new_tokens: int,
             advance: Callable[[int], None]) -> list[str]:
    from tunery.data.tokenize import chat_messages
    from tunery.eval.scoring import generate_all
    from tunery.infer.generation import SamplingParams

    prompts = [list(tokenizer(tokenizer.apply_chat_template(chat_messages(r["messages"]), tokenize=False,
                                                            add_generation_prompt=True),
                              add_special_tokens=False).input_ids) for r in rows]
    was_training = model.training
    model.eval()
    try:
        return generate_all(model, tokenizer, prompts, params=SamplingParams(temperature=0),
                            max_new_tokens=max_new_tokens, stops=[], batch_size=batch_size, advance=advance)
    finally:
        model.train(was_training)


def _general_loss(model, tokenizer, *, batch_size: int, advance: Callable[[int], None]) -> float:
    from tunery.data import tokenize_rows
    from tunery.eval.scoring import completion_loss

    examples = tokenize_rows(general_text(), "text", tokenizer, max_length=MAX_TEXT_TOKENS)
    return completion_loss(model, tokenizer, examples, batch_size=batch_size, advance=advance)


def _answer_loss(model, tokenizer, rows: list[dict], answers: list[str], *, batch_size: int,
                 advance: Callable[[int], None]) -> float:
    from tunery.data import tokenize_rows
    from tunery.eval.scoring import completion_loss

    chats = [{"messages": [*r["messages"], {"role": "assistant", "content": a}]} for r, a in zip(rows, answers,
                                                                                                strict=True)]
    examples = tokenize_rows(chats, "messages", tokenizer, max_length=1024)
    return completion_loss(model, tokenizer, examples, batch_size=batch_size, advance=advance)
