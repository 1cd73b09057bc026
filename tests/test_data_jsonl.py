"""read_jsonl: valid files of each format, and every kind of bad line reported where it is."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import write_jsonl
from tunery.data import read_jsonl
from tunery.errors import DataError, LineError, TuneryError

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def test_reads_each_format(tmp_path):
    cases = {
        "text": [{"text": "one"}, {"text": "two"}],
        "prompt_completion": [{"prompt": "Q:", "completion": " A"}],
        "messages": [CHAT, {"messages": [{"role": "system", "content": "Be kind."}, *CHAT["messages"]]}],
    }
    for fmt, rows in cases.items():
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
        ds = read_jsonl(path)
        assert (ds.format, ds.rows, ds.name, ds.path) == (fmt, rows, str(path), str(path))
        assert ds.lines == list(range(1, len(rows) + 1))
        assert ds.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_bom_blank_lines_and_crlf_are_accepted_and_lines_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    content = '\n{"text": "a"}\r\n   \n\t\n{"text": "b"}\n\n'
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    ds = read_jsonl(path, name="train_data")
    assert ds.rows == [{"text": "a"}, {"text": "b"}]
    assert ds.lines == [2, 5]
    assert ds.name == "train_data"


def _one_error(tmp_path, bad_line: str | bytes) -> LineError:
    """Write a valid line, a blank line and ``bad_line`` (line 3); return the one error found."""
    path = tmp_path / "d.jsonl"
    bad = bad_line if isinstance(bad_line, bytes) else bad_line.encode()
    path.write_bytes(b'{"text": "ok"}\n\n' + bad + b"\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path, name="data.jsonl")
    assert len(info.value.errors) == 1, info.value.errors
    error = info.value.errors[0]
    assert (error.path, error.line) == ("data.jsonl", 3)
    assert info.value.summary == "data.jsonl: 1 of 2 lines is invalid"
    return error


def _msgs(*messages) -> str:
    return json.dumps({"messages": list(messages)})


USER = {"role": "user", "content": "Hi"}
BOT = {"role": "assistant", "content": "Hello"}

BAD_LINES = [
    # (line, field, words the reason must contain)
    (b'{"text": "caf\xe9"}', None, "not valid UTF-8"),
    ('{"text": "a",}', None, "not valid JSON"),
    ('{"text": "a"', None, "not valid JSON"),
    ("[1, 2]", None, "expected a JSON object, got an array"),
    ('"just a string"', None, "expected a JSON object, got a string"),
    ('{"input": "x", "output": "y"}', None, "no 'text', 'prompt'/'completion' or 'messages' key"),
    ('{"prompt": "x"}', "completion", "missing"),
    ('{"completion": "x"}', "prompt", "missing"),
    ('{"text": "a", "id": 3}', "id", "unknown key in a text row"),
    ('{"text": 5}', "text", "must be a string, got a number"),
    ('{"text": null}', "text", "must be a string, got null"),
    ('{"prompt": "x", "completion": ["y"]}', "completion", "must be a string, got an array"),
    ('{"text": ""}', "text", "is empty"),
    ('{"prompt": "x", "completion": " \\n\\t"}', "completion", "is only whitespace"),
    ('{"text": "a", "text": "b"}', "text", "more than once"),
    ('{"messages": "Hi"}', "messages", "must be a non-empty list"),
    ('{"messages": []}', "messages", "got an empty list"),
    (_msgs("Hi", BOT), "messages[0]", "expected an object with role and content, got a string"),
    (_msgs({"content": "Hi"}, BOT), "messages[0].role", "missing"),
    (_msgs(USER, {"role": "assistant"}), "messages[1].content", "missing"),
    (
        _msgs({"role": "tool", "content": "42"}, BOT),
        "messages[0].role",
        "must be one of system, user, assistant",
    ),
    (_msgs({"role": 1, "content": "Hi"}, BOT), "messages[0].role", "got a number"),
    (_msgs(USER, {"role": "assistant", "content": ""}), "messages[1].content", "is empty"),
    (_msgs(USER, {"role": "assistant", "content": 7}), "messages[1].content", "must be a string"),
    (_msgs(USER, {**BOT, "name": "bob"}), "messages[1].name", "unknown key in a message"),
    (_msgs(USER, {"role": "system", "content": "S"}), "messages", "has no assistant message"),
]


@pytest.mark.parametrize(("line", "field", "reason"), BAD_LINES)
def test_bad_line_is_reported_with_its_line_field_and_reason(tmp_path, line, field, reason):
    error = _one_error(tmp_path, line)
    assert error.field == field
    assert reason in error.reason


def test_json_error_includes_jsons_own_message(tmp_path):
    line = '{"text": "a",}'
    try:
        json.loads(line)
    except json.JSONDecodeError as exc:
        expected = exc.msg
    assert expected in _one_error(tmp_path, line).reason


def test_every_problem_of_a_line_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": 3, "extra": "x"}])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    fields = sorted(e.field for e in info.value.errors)
    assert fields == ["completion", "extra", "prompt"]
    assert all(e.line == 1 for e in info.value.errors)
    assert info.value.summary.endswith("1 of 1 lines is invalid")


def test_more_than_twenty_bad_lines_are_all_kept_and_twenty_shown(tmp_path):
    rows = [{"text": "fine"}] + [{"text": ""} for _ in range(25)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_jsonl(path, name="t.jsonl")
    exc = info.value
    assert [e.line for e in exc.errors] == list(range(2, 27))
    message = str(exc).splitlines()
    assert message[0] == "t.jsonl: 25 of 26 lines are invalid"
    assert message[1] == "t.jsonl:2: text: is empty"
    assert len(message) == 1 + 20 + 1
    assert message[-1] == "... and 5 more bad lines"


@pytest.mark.parametrize("content", [b"", b"\n  \n\r\n", b"\xef\xbb\xbf"])
def test_a_file_without_rows_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_jsonl(path, name="e.jsonl")
    assert len(info.value.errors) == 1
    assert "no rows" in info.value.errors[0].reason
    assert "e.jsonl" in str(info.value)


def test_mixed_formats_name_both_formats(tmp_path):
    rows = [{"text": "a"}, {"prompt": "p", "completion": "c"}, {"text": "b"}, CHAT]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    errors = info.value.errors
    assert [e.line for e in errors] == [2, 4]
    assert "prompt_completion" in errors[0].reason and "text" in errors[0].reason
    assert "messages" in errors[1].reason and "line 1" in errors[1].reason


def test_the_first_valid_row_decides_the_format(tmp_path):
    rows = [{"prompt": "p"}, {"text": "a"}, {"prompt": "p", "completion": "c"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    errors = info.value.errors
    assert [(e.line, e.field) for e in errors] == [(1, "completion"), (3, None)]
    assert "a prompt_completion row in a text file (line 2 set the format)" in errors[1].reason


def test_errors_are_sorted_by_line_across_both_passes(tmp_path):
    rows = [{"text": "a"}, {"prompt": "p", "completion": "c"}, "not json", {"text": ""}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert [e.line for e in info.value.errors] == [2, 3, 4]
    assert info.value.summary.endswith("3 of 4 lines are invalid")


def test_missing_file_is_a_plain_tuneryerror(tmp_path):
    with pytest.raises(TuneryError, match="train_data: cannot read the file") as info:
        read_jsonl(tmp_path / "nope.jsonl", name="train_data")
    assert not isinstance(info.value, DataError)
