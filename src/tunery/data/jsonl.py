"""Read and validate a JSONL training file.

Every row of a file must have the same one of three shapes:

* ``{"text": str}``: plain text, trained on as a whole;
* ``{"prompt": str, "completion": str}``: the loss is on the completion only (by default);
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat, rendered with the base model's
  chat template; the loss is on the assistant turns only (by default).

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

Format = Literal["text", "prompt_completion", "messages"]

#: The keys a row of each format must have, and may only have.
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content")

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

    ``messages`` wins over ``prompt``/``completion``, which win over ``text``; the keys of
    the other formats are then reported as unknown keys of the chosen one.
    """
    if "messages" in row:
        return "messages"
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
        reason = f"no 'text', 'prompt'/'completion' or 'messages' key (keys found: {found})"
        return row, None, [err(None, reason)]

    allowed = FORMAT_KEYS[fmt]
    errors = [
        err(key, f"unknown key in a {fmt} row (allowed: {', '.join(allowed)})")
        for key in row
        if key not in allowed
    ]
    errors += [err(key, "missing") for key in allowed if key not in row]
    if fmt == "messages":
        if "messages" in row:
            errors += [err(field, reason) for field, reason in _check_messages(row["messages"])]
    else:
        for key in allowed:
            if key in row:
                problem = _check_string(row[key])
                if problem:
                    errors.append(err(key, problem))
    return row, fmt, errors


def _check_messages(messages: Any) -> list[tuple[str, str]]:
    """Problems of a ``messages`` value, as (field, reason) pairs."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else _json_type(messages)
        return [("messages", f"must be a non-empty list of {{role, content}} objects, got {got}")]
    problems: list[tuple[str, str]] = []
    has_assistant = False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append((where, f"expected an object with role and content, got {_json_type(message)}"))
            continue
        for key in message:
            if key not in MESSAGE_KEYS:
                problems.append((f"{where}.{key}", "unknown key in a message (allowed: role, content)"))
        for key in MESSAGE_KEYS:
            if key not in message:
                problems.append((f"{where}.{key}", "missing"))
        role = message.get("role")
        if "role" in message and role not in ROLES:
            shown = repr(role) if isinstance(role, str) else _json_type(role)
            problems.append((f"{where}.role", f"must be one of {', '.join(ROLES)}; got {shown}"))
        if "content" in message:
            problem = _check_string(message["content"])
            if problem:
                problems.append((f"{where}.content", problem))
        has_assistant = has_assistant or role == "assistant"
    if not has_assistant:
        problems.append(("messages", "has no assistant message, so there is nothing to train on"))
    return problems


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
