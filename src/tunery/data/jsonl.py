"""Read and validate a JSONL training file.

Every row of a file must have the same one of four shapes:

* ``{"text": str}``: plain text, trained on as a whole;
* ``{"prompt": str, "completion": str}``: the loss is on the completion only (by default);
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat, rendered with the base model's
  chat template; the loss is on the assistant turns only (by default). As in OpenAI's
  fine-tuning format, an assistant message may carry ``"weight": 0`` (not trained on) or
  ``"weight": 1`` (trained on, the default);
* ``{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
  "non_preferred_output": [{"role": "assistant", "content": ...}]}``: a preference pair in
  OpenAI's DPO format, for method=dpo: two answers to the same conversation, the first preferred.
* ``{"messages": [..., {"role": "user", ...}], "any": ..., "other": ...}``: a prompt in OpenAI's
  reinforcement fine-tuning format, for method=grpo: the messages end with the user's, which the
  model answers; the row's other fields are what its grader reads (``{{ item.any }}``).

`read_jsonl` checks the whole file before returning and reports every problem it finds at
once, each with its line number, so a user fixes a file in one round instead of one line
per attempt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from tunery.errors import DataError, LineError, TuneryError

Format = Literal["text", "prompt_completion", "messages", "preference", "rft"]

#: The keys a row of each format must have, and may only have.
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "preference": ("input", "preferred_output", "non_preferred_output"),
    "rft": ("messages",),  # and any other fields, for the grader
}
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content")
#: Keys OpenAI's preference format allows in `input` that tunery does not train on.
UNSUPPORTED_INPUT_KEYS = ("tools", "parallel_tool_calls")

_BOM = b"\xef\xbb\xbf"


@dataclass
class Dataset:
    """A validated JSONL file.

    ``rows[i]`` was read from line ``lines[i]`` (1-based) of the file; every row has the keys
    of ``format`` and no others. ``sha256`` is the hash of the file's bytes as read, so a
    training record can say exactly which data it saw.
    """

    path: str
    name: str
    format: Format
    rows: list[dict]
    lines: list[int]
    sha256: str

    def __len__(self) -> int:
        return len(self.rows)


def read_jsonl(path: str | Path, *, name: str | None = None) -> Dataset:
    """Read a JSONL file and validate every line.

    Blank and whitespace-only lines are skipped, and a UTF-8 byte-order mark at the start of
    the file is accepted. The file's format is the format of its first valid row.

    Returns the Dataset only if every non-blank line is a valid row of that format. Otherwise
    raises `DataError` holding one `LineError` per problem (all of them, not just the
    first), each naming ``name`` (default: ``path``) as the file. A file with no rows is an
    error too. Raises `TuneryError` if the file cannot be read at all.
    """
    name = str(path) if name is None else name
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TuneryError(f"{name}: cannot read the file: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]

    errors: list[LineError] = []
    parsed: list[tuple[int, dict, str | None]] = []  # (line number, row, the row's own format)
    n_lines = 0
    # Split on "\n" only: JSON strings cannot hold a raw newline, and this numbers lines the
    # way editors and `wc -l` do. A trailing "\r" (Windows line ending) is whitespace to JSON.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        n_lines += 1
        row, fmt, line_errors = _parse_line(raw, name, number)
        errors += line_errors
        if not line_errors:
            parsed.append((number, row, fmt))

    file_format = parsed[0][2] if parsed else None
    first_line = parsed[0][0] if parsed else 0
    rows: list[dict] = []
    lines: list[int] = []
    for number, row, fmt in parsed:
        if fmt != file_format:
            if {fmt, file_format} == {"messages", "rft"}:  # a chat whose last message is the wrong one
                reason = (f"ends with the user's message, so it has no answer to train on (line {first_line} "
                          "set the format: chats ending with the assistant's answer)" if fmt == "rft" else
                          f"ends with an assistant message, but the file holds prompts for reinforcement "
                          f"fine-tuning (line {first_line} set the format): they end with the user's message")
                errors.append(LineError(name, number, "messages", reason))
                continue
            errors.append(
                LineError(
                    name,
                    number,
                    None,
                    f"a {fmt} row in a {file_format} file (line {first_line} set the format); "
                    "every row must use the same format",
                )
            )
            continue
        rows.append(row)
        lines.append(number)

    if errors:
        errors.sort(key=lambda e: e.line)  # the format errors were found in a second pass
        n_bad = len({e.line for e in errors})
        verb = "is" if n_bad == 1 else "are"
        raise DataError(errors, summary=f"{name}: {n_bad} of {n_lines} lines {verb} invalid")
    if not rows:
        # Line 0 stands for the file as a whole: there is no line to point at.
        raise DataError(
            [LineError(name, 0, None, "the file has no rows (it is empty or has only blank lines)")],
            summary=f"{name}: no training rows",
        )
    return Dataset(
        path=str(path), name=name, format=cast(Format, file_format), rows=rows, lines=lines, sha256=digest
    )


def detect_format(row: dict) -> Format | None:
    """The format a row's keys ask for, or None when it has none of the known keys.

    ``messages`` wins over the preference keys (ending with a user message, it is a prompt for
    reinforcement fine-tuning, ``rft``) (``preferred_output``, ``non_preferred_output``, or
    an object ``input``), which win over ``prompt``/``completion``, which win over ``text``;
    the keys of the other formats are then reported as unknown keys of the chosen one.
    """
    if "messages" in row:
        messages = row["messages"]
        last = messages[-1] if isinstance(messages, list) and messages else None
        return "rft" if isinstance(last, dict) and last.get("role") == "user" else "messages"
    # An "input" alone makes a preference row only when it holds an object (OpenAI's {"messages": ...}):
    # {"input": "...", "output": "..."} rows are another format, not a broken preference row.
    if "preferred_output" in row or "non_preferred_output" in row or isinstance(row.get("input"), dict):
        return "preference"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def _parse_line(raw: bytes, name: str, number: int) -> tuple[Any, str | None, list[LineError]]:
    """Decode, parse and validate one non-blank line: (row, its format, its errors)."""

    def err(field: str | None, reason: str) -> LineError:
        return LineError(name, number, field, reason)

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.end].hex(" ")
        return None, None, [err(None, f"not valid UTF-8 (bytes {bad} at byte {exc.start + 1} of the line)")]
    try:
        row = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKeyError as exc:
        return None, None, [err(exc.key, "key appears more than once in the same object")]
    except json.JSONDecodeError as exc:
        return None, None, [err(None, f"not valid JSON: {exc.msg} (column {exc.colno})")]
    except RecursionError:
        return None, None, [err(None, "not valid JSON: nested too deeply")]

    if not isinstance(row, dict):
        return None, None, [err(None, f"expected a JSON object, got {_json_type(row)}")]
    fmt = detect_format(row)
    if fmt is None:
        found = ", ".join(repr(k) for k in row) or "none"
        reason = (f"no 'text', 'prompt'/'completion', 'messages' or 'input'/'preferred_output'/"
                  f"'non_preferred_output' key (keys found: {found})")
        return row, None, [err(None, reason)]

    allowed = FORMAT_KEYS[fmt]
    errors = [
        err(key, f"unknown key in a {fmt} row (allowed: {', '.join(allowed)})")
        for key in row
        if key not in allowed and fmt != "rft"  # an RFT row's other fields are its grader's
    ]
    errors += [err(key, "missing") for key in allowed if key not in row]
    if fmt == "messages":
        if "messages" in row:
            errors += [err(field, reason) for field, reason in _check_messages(row["messages"])]
    elif fmt == "rft":
        errors += [err(field, reason) for field, reason in _check_messages(row["messages"], weights=False)]
    elif fmt == "preference":
        errors += [err(field, reason) for field, reason in _check_preference(row)]
    else:
        for key in allowed:
            if key in row:
                problem = _check_string(row[key])
                if problem:
                    errors.append(err(key, problem))
    return row, fmt, errors


def _check_messages(messages: Any, *, where: str = "messages", weights: bool = True) -> list[tuple[str, str]]:
    """Problems of a chat's messages, as (field, reason) pairs; `where` is the field holding them.

    With `weights` (a chat row) an assistant message may carry OpenAI's ``weight`` (0: not trained
    on, 1: trained on), and the chat needs an assistant message of weight 1. Without (the input of
    a preference row, whose outputs are what is trained) any ``weight`` is an unknown key.
    """
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else _json_type(messages)
        return [(where, f"must be a non-empty list of {{role, content}} objects, got {got}")]
    allowed = (*MESSAGE_KEYS, "weight") if weights else MESSAGE_KEYS
    problems: list[tuple[str, str]] = []
    assistants = trained = 0
    for i, message in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            problems.append((at, f"expected an object with role and content, got {_json_type(message)}"))
            continue
        for key in message:
            if key not in allowed:
                problems.append((f"{at}.{key}", f"unknown key in a message (allowed: {', '.join(allowed)})"))
        for key in MESSAGE_KEYS:
            if key not in message:
                problems.append((f"{at}.{key}", "missing"))
        role = message.get("role")
        if "role" in message and role not in ROLES:
            shown = repr(role) if isinstance(role, str) else _json_type(role)
            problems.append((f"{at}.role", f"must be one of {', '.join(ROLES)}; got {shown}"))
        if "content" in message:
            problem = _check_string(message["content"])
            if problem:
                problems.append((f"{at}.content", problem))
        weight = message.get("weight", 1)
        if weights and "weight" in message:
            if role in ROLES and role != "assistant":
                problems.append((f"{at}.weight", f"only assistant messages have a weight (this one is {role})"))
            elif type(weight) is not int or weight not in (0, 1):  # bool is an int subclass: not a weight
                number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
                shown = repr(weight) if number else _json_type(weight)
                problems.append((f"{at}.weight", f"must be 0 (not trained on) or 1 (trained on); got {shown}"))
        if role == "assistant":
            assistants += 1
            trained += weight != 0
    if weights and not assistants:
        problems.append((where, "has no assistant message, so there is nothing to train on"))
    elif weights and not trained:
        problems.append((where, "every assistant message has weight 0, so there is nothing to train on"))
    return problems


def _check_preference(row: dict) -> list[tuple[str, str]]:
    """Problems of a preference row's values (its keys are checked by the caller)."""
    problems: list[tuple[str, str]] = []
    if "input" in row:
        value = row["input"]
        if not isinstance(value, dict):
            problems.append(("input", f"must be an object holding the conversation's messages, got "
                                      f"{_json_type(value)}"))
        else:
            for key in value:
                if key in UNSUPPORTED_INPUT_KEYS:
                    problems.append((f"input.{key}", "not supported: tool calls are not trained here "
                                                     "(remove it, with any tool messages)"))
                elif key != "messages":
                    problems.append((f"input.{key}", "unknown key in a preference input (allowed: messages)"))
            if "messages" not in value:
                problems.append(("input.messages", "missing"))
            else:
                messages = value["messages"]
                found = _check_messages(messages, where="input.messages", weights=False)
                problems += found
                if not found and messages[-1].get("role") != "user":
                    problems.append((f"input.messages[{len(messages) - 1}].role",
                                     "the last input message must be the user's (the outputs answer it); "
                                     f"got {messages[-1]['role']}"))
    for key in ("preferred_output", "non_preferred_output"):
        if key in row:
            problems += _check_output(row[key], key)
    if not problems and all(key in row for key in FORMAT_KEYS["preference"]):
        if row["preferred_output"][0]["content"] == row["non_preferred_output"][0]["content"]:
            problems.append(("non_preferred_output[0].content", "is the same as preferred_output's, so there "
                                                                "is no preference to learn"))
    return problems


def _check_output(value: Any, where: str) -> list[tuple[str, str]]:
    """Problems of a preference row's output: a list of exactly one assistant message."""
    if not isinstance(value, list) or len(value) != 1:
        got = f"a list of {len(value)} messages" if isinstance(value, list) else _json_type(value)
        return [(where, f"must be a list of exactly one assistant message, got {got}")]
    message = value[0]
    at = f"{where}[0]"
    if not isinstance(message, dict):
        return [(at, f"expected an object with role and content, got {_json_type(message)}")]
    problems = [(f"{at}.{key}", "unknown key in an output message (allowed: role, content)")
                for key in message if key not in MESSAGE_KEYS]
    problems += [(f"{at}.{key}", "missing") for key in MESSAGE_KEYS if key not in message]
    if "role" in message and message["role"] != "assistant":
        role = message["role"]
        shown = repr(role) if isinstance(role, str) else _json_type(role)
        problems.append((f"{at}.role", f"must be assistant; got {shown}"))
    if "content" in message and (problem := _check_string(message["content"])):
        problems.append((f"{at}.content", problem))
    return problems


def method_problem(method: str, fmt: str) -> str | None:
    """Why rows of format `fmt` cannot train with `method` (to follow a file's name), or None: DPO
    trains on preference rows only, GRPO on RFT prompts only, supervised tuning on every other format."""
    if method == "dpo" and fmt != "preference":
        return (f"has {fmt} rows, but method=dpo trains on preference rows "
                '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}')
    if method == "grpo" and fmt != "rft":
        return (f"has {fmt} rows, but method=grpo trains on prompts: rows whose messages end with the user's "
                'message, {"messages": [..., {"role": "user", "content": ...}], plus the fields the grader reads}')
    if method != "dpo" and fmt == "preference":
        return (f"has preference rows, which train with method=dpo; method={method} "
                "trains on text, prompt/completion or chat rows")
    if method != "grpo" and fmt == "rft":
        return (f"has prompts without answers (their messages end with the user's), which train with "
                f"method=grpo and a grader; method={method} trains on chats ending with the assistant's answer")
    return None


def check_method(method: str, dataset: Dataset, field: str = "train_data") -> None:
    """TuneryError (one line naming the file and its format) when `dataset` cannot train with `method`."""
    if problem := method_problem(method, dataset.format):
        raise TuneryError(f"{dataset.name} ({field}) {problem}")


def _check_string(value: Any) -> str | None:
    """Why ``value`` is not a usable text field, or None if it is one."""
    if not isinstance(value, str):
        return f"must be a string, got {_json_type(value)}"
    if not value.strip():
        return "is empty" if not value else "is only whitespace"
    return None


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, as a user wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads hook: Python keeps the last of two equal keys silently; we refuse instead,
    since one of the two values the user wrote would be dropped without a word."""
    row: dict = {}
    for key, value in pairs:
        if key in row:
            raise _DuplicateKeyError(key)
        row[key] = value
    return row
