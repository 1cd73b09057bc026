"""Turn validated rows into token ids and loss labels.

A label of ``IGNORE_INDEX`` (-100, what PyTorch's cross-entropy and transformers' loss skip)
marks a token the model is not trained to predict. Labels are aligned with ``input_ids``
(not shifted): the model's loss shifts them itself.

What is labelled, by format (``train_on_inputs=True`` labels every token instead):

* text: every token, plus the end-of-sequence token appended to each row;
* prompt_completion: the completion's tokens and the appended end-of-sequence token;
* messages: each assistant turn's content and the template's end-of-turn marker after it, except
  the turns of weight 0 (OpenAI's ``"weight": 0`` on an assistant message);
* preference (`preference_examples`): two chats per row, the input's messages followed by the
  preferred or by the non-preferred answer, each labelled on that answer only. DPO training
  tokenizes these rows itself (TRL's DPOTrainer); these Examples serve evaluation and data checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError

from tunery.data.jsonl import Format
from tunery.errors import TuneryError

IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenized row: ``labels[i]`` is ``input_ids[i]`` or IGNORE_INDEX (no loss).

    ``truncated`` is True when the row was longer than the limit and lost its tail.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def labelled_tokens(self) -> int:
        """How many tokens carry a loss (0 means the row trains nothing, e.g. truncated away)."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def tokenize_rows(
    rows: list[dict],
    fmt: Format,
    tokenizer: Any,
    *,
    max_length: int,
    train_on_inputs: bool = False,
) -> list[Example]:
    """Tokenize rows of one format into Examples, one per row, in order.

    Every Example has at most ``max_length`` tokens: a longer row keeps its head and is
    marked ``truncated`` (never dropped, so the caller can count and report them).

    Raises TuneryError if the tokenizer has no end-of-sequence token, or for chat rows if it
    has no chat template (or one whose renderings are not prefixes of each other, which the
    assistant spans are found from).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    eos = eos_token_id(tokenizer)
    if fmt == "text":
        texts = [row["text"] for row in rows]
        examples = [
            _example(ids + [eos], None, train_on_inputs=True) for ids in _batch_ids(tokenizer, texts, True)
        ]
    elif fmt == "prompt_completion":
        prompts = _batch_ids(tokenizer, [row["prompt"] for row in rows], True)
        completions = _batch_ids(tokenizer, [row["completion"] for row in rows], False)
        examples = [
            _example(p + c + [eos], len(p), train_on_inputs=train_on_inputs)
            for p, c in zip(prompts, completions, strict=True)
        ]
    elif fmt == "messages":
        _require_chat_template(tokenizer)
        examples = []
        for k, row in enumerate(rows):
            try:
                examples.append(_chat_example(tokenizer, row["messages"], eos, train_on_inputs))
            except TemplateError as exc:  # the template's own raise_exception, e.g. no system role
                raise TuneryError(f"chat row {k + 1}: the chat template refuses it: {exc} (use chat_template to "
                                  "give another template, or change the row)") from None
    elif fmt == "preference":
        raise ValueError("preference rows tokenize into pairs: use preference_examples")
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return [_truncate(example, max_length) for example in examples]


@dataclass
class PreferencePair:
    """One tokenized preference row: the conversation ending in the preferred answer, and ending
    in the non-preferred one; each labelled on its answer (and end-of-turn marker) only."""

    preferred: Example
    non_preferred: Example


def preference_chats(row: dict) -> tuple[list[dict], list[dict]]:
    """A preference row's two chats: input messages + preferred output, input messages + non-preferred
    output. The input's own assistant turns get weight 0: only the compared answers are scored."""
    context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in row["input"]["messages"]]
    return context + row["preferred_output"], context + row["non_preferred_output"]


def preference_examples(rows: list[dict], tokenizer: Any, *, max_length: int) -> list[PreferencePair]:
    """Tokenize preference rows into pairs of Examples (chat template rendering, as for chat rows),
    each truncated to ``max_length`` tokens like `tokenize_rows` does."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    _require_chat_template(tokenizer, "preference rows")
    eos = eos_token_id(tokenizer)
    pairs = []
    for row in rows:
        preferred, non_preferred = preference_chats(row)
        pairs.append(PreferencePair(_truncate(_chat_example(tokenizer, preferred, eos, False), max_length),
                                    _truncate(_chat_example(tokenizer, non_preferred, eos, False), max_length)))
    return pairs


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The ids a prompt had in training (with the tokenizer's special tokens, e.g. BOS).

    Generation from a prompt_completion-tuned model must start from exactly these ids: the
    prompt was tokenized on its own in training, so a prompt's last token is never merged
    with the completion's first.
    """
    return list(tokenizer(prompt, add_special_tokens=True).input_ids)


def eos_token_id(tokenizer: Any) -> int:
    """The tokenizer's end-of-sequence id; TuneryError if it has none."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise TuneryError(
            "the base model's tokenizer has no end-of-sequence token, so a tuned model "
            "could not learn where an answer stops"
        )
    return int(eos)


def _batch_ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of many texts in one call (a fast tokenizer runs the batch in Rust)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens).input_ids]


def _example(ids: list[int], n_unlabelled: int | None, *, train_on_inputs: bool) -> Example:
    """An Example whose first ``n_unlabelled`` tokens carry no loss (None or train_on_inputs: all do)."""
    if train_on_inputs or not n_unlabelled:
        return Example(ids, list(ids))
    return Example(ids, [IGNORE_INDEX] * n_unlabelled + ids[n_unlabelled:])


def _truncate(example: Example, max_length: int) -> Example:
    if len(example.input_ids) <= max_length:
        return example
    return Example(example.input_ids[:max_length], example.labels[:max_length], truncated=True)


def _require_chat_template(tokenizer: Any, what: str = "") -> None:
    if getattr(tokenizer, "chat_template", None):
        return
    if what:
        raise TuneryError(f"this data has {what}, which are chats and need a base model whose tokenizer has a "
                          "chat template; this one has none: use an instruct/chat base model")
    raise TuneryError(
        'this data has chat rows ({"messages": [...]}), which need a base model whose tokenizer '
        "has a chat template; this one has none: use an instruct/chat base model, or convert the "
        'rows to {"prompt", "completion"} or {"text"}'
    )


def chat_messages(messages: list[dict]) -> list[dict]:
    """Messages as a chat template takes them: role and content only (a training row's ``weight``
    is for the loss mask, not for the template)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def schema_message(schema: dict) -> dict:
    """The system message that shows the model a response_format's JSON schema (RFT prompts)."""
    import json

    body = schema.get("json_schema", {}).get("schema", schema)
    return {"role": "system", "content": "Answer with JSON only, following this JSON schema: "
            + json.dumps(body, ensure_ascii=False)}


def rft_prompt(row: dict, schema: dict | None = None) -> list[dict]:
    """An RFT row's prompt as chat messages (the response_format's schema first, when there is one)."""
    messages = chat_messages(row["messages"])
    return [schema_message(schema), *messages] if schema else messages


def prompt_examples(rows: list[dict], tokenizer: Any, *, answer_tokens: int,
                    schema: dict | None = None) -> tuple[list[int], list[Example]]:
    """RFT prompts as GRPO trains them: (each prompt's length in tokens, in the chat template with its
    generation prompt; one Example of the longest prompt followed by `answer_tokens` labelled answer
    tokens, the longest sequence a step can hold, for memory estimates)."""
    _require_chat_template(tokenizer, "RFT prompts")
    texts = [_render(tokenizer, rft_prompt(r, schema), add_generation_prompt=True) for r in rows]
    lengths = [len(ids) for ids in _batch_ids(tokenizer, texts, add_special_tokens=False)] if texts else []
    longest = max(lengths, default=0)
    examples = [Example([0] * (longest + answer_tokens), [IGNORE_INDEX] * longest + [0] * answer_tokens)] \
        if lengths else []
    return lengths, examples


def _render(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        chat_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a chat and find the character span of each assistant turn in the text.

    A turn's span starts where the generation prompt before it ends (what the model sees at
    inference) and ends after the template's end-of-turn marker (``<|im_end|>``,
    ``<|eot_id|>``, ...), without the whitespace templates put between turns: a model never
    needs to produce that, generation stops at the marker.

    The spans come from rendering prefixes of the chat, which works for any template whose
    rendering of ``messages[:i+1]`` starts the rendering of the whole chat; TuneryError if not.
    """
    text = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[: i + 1])
        if not text.startswith(upto):
            # Templates that render earlier turns differently from the last one (Qwen3 drops
            # their reasoning; Phi-3 ends a chat with its eos): find each answer in the whole chat.
            return text, _spans_in_order(tokenizer, messages, text)
        start = -1
        if i > 0:
            before = _render(tokenizer, messages[:i], add_generation_prompt=True)
            if upto.startswith(before):
                start = len(before)
        if start < 0:
            # A chat that opens with an assistant turn: an empty chat's generation prompt is not
            # a prefix when the template adds a default system prompt. Templates may trim content.
            start = upto.rfind(message["content"].strip())
        if start < 0:
            raise TuneryError(
                f"the base model's chat template does not reproduce assistant message {i} verbatim, "
                'so its tokens cannot be labelled; use {"prompt", "completion"} rows with this base model'
            )
        spans.append((start, len(upto.rstrip())))
    return text, spans


def _spans_in_order(tokenizer: Any, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Each assistant turn's span found in `text` in order: its content, then the template's
    end-of-turn marker when it follows (what the template writes between an answer and the next
    user turn's opening, without trailing whitespace)."""
    _U, _A, _U2 = "\x01USER\x01", "\x01ASSISTANT\x01", "\x01NEXT\x01"
    try:
        opening = _render(tokenizer, [{"role": "user", "content": _U}]).partition(_U)[0]
        going = _render(tokenizer, [{"role": "user", "content": _U}, {"role": "assistant", "content": _A},
                                    {"role": "user", "content": _U2}])
    except Exception:  # a template that refuses these probe chats: no marker to add
        opening = going = ""
    between = going.partition(_A)[2].partition(_U2)[0]
    # The user turn's opening ends `between`; a first turn's may carry more in front (a BOS).
    cut = next((k for k in range(len(opening), 0, -1) if between.endswith(opening[-k:])), 0)
    marker = between[: len(between) - cut].rstrip()
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"]
        start = text.find(content, cursor) if content else -1
        if start < 0:
            raise TuneryError(
                f"the base model's chat template does not reproduce assistant message {i} verbatim, "
                'so its tokens cannot be labelled; use {"prompt", "completion"} rows with this base model'
            )
        end = start + len(content)
        if marker and text.startswith(marker, end):
            end += len(marker)
        spans.append((start, end))
        cursor = end
    return spans


def _chat_example(tokenizer: Any, messages: list[dict], eos: int, train_on_inputs: bool) -> Example:
    text, all_spans = assistant_spans(tokenizer, messages)
    # OpenAI's weight: an assistant turn of weight 0 is context, not something to learn to say.
    weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    spans = [span for span, weight in zip(all_spans, weights, strict=True) if weight != 0]
    # No special tokens added: chat templates write their own BOS where the model wants one.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding.input_ids)
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, end) in enumerate(encoding.offset_mapping):
        # A token that holds any character of an assistant turn is labelled: it must be produced
        # for the turn to appear. Added special tokens have empty (0, 0) spans and never match.
        if start < end and any(start < span_end and end > span_start for span_start, span_end in spans):
            labels[k] = ids[k]
    eos_text = tokenizer.eos_token
    if not (eos_text and text.rstrip().endswith(eos_text)):
        ids.append(eos)
        # The appended EOS ends the answer when the chat ends with one; after a final user turn
        # it is not something the model should learn to say.
        trained_last = messages[-1]["role"] == "assistant" and messages[-1].get("weight", 1) != 0
        labels.append(eos if trained_last else IGNORE_INDEX)
    if train_on_inputs:
        labels = list(ids)
    return Example(ids, labels)
