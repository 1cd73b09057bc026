"""read_jsonl: valid files of each format, and every kind of bad line reported where it is."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import write_jsonl
from tunery.data import read_jsonl
from tunery.errors import DataError, LineError, TuneryError

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
PREF = {
    "input": {"messages": [{"role": "user", "content": "Hi"}]},
    "preferred_output": [{"role": "assistant", "content": "Hello!"}],
    "non_preferred_output": [{"role": "assistant", "content": "What?"}],
}


def test_reads_each_format(tmp_path):
    cases = {
        "text": [{"text": "one"}, {"text": "two"}],
        "prompt_completion": [{"prompt": "Q:", "completion": " A"}],
        "messages": [CHAT, {"messages": [{"role": "system", "content": "Be kind."}, *CHAT["messages"]]},
                     {"messages": [*CHAT["messages"], {"role": "user", "content": "Again"},
                                   {"role": "assistant", "content": "Hello", "weight": 0},
                                   {"role": "user", "content": "Once more"},
                                   {"role": "assistant", "content": "Hi", "weight": 1}]}],
        "preference": [PREF, {**PREF, "input": {"messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]}}],
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


def _pref(drop: str | None = None, **changes) -> str:
    row = {**PREF, **changes}
    row.pop(drop or "", None)
    return json.dumps(row)


BAD_LINES = [
    # (line, field, words the reason must contain)
    (b'{"text": "caf\xe9"}', None, "not valid UTF-8"),
    ('{"text": "a",}', None, "not valid JSON"),
    ('{"text": "a"', None, "not valid JSON"),
    ("[1, 2]", None, "expected a JSON object, got an array"),
    ('"just a string"', None, "expected a JSON object, got a string"),
    ('{"input": "x", "output": "y"}', None, "no 'text', 'prompt'/'completion', 'messages' or "
     "'input'/'preferred_output'/'non_preferred_output' key (keys found: 'input', 'output')"),
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
    # OpenAI's weight on assistant messages
    (_msgs(USER, {**BOT, "weight": 2}), "messages[1].weight", "must be 0 (not trained on) or 1 (trained on); got 2"),
    (_msgs(USER, {**BOT, "weight": 0.5}), "messages[1].weight", "got 0.5"),
    (_msgs(USER, {**BOT, "weight": True}), "messages[1].weight", "got a boolean"),
    (_msgs(USER, {**BOT, "weight": "1"}), "messages[1].weight", "got a string"),
    (_msgs({**USER, "weight": 1}, BOT), "messages[0].weight", "only assistant messages have a weight (this one is user)"),
    (_msgs(USER, {**BOT, "weight": 0}), "messages", "every assistant message has weight 0, so there is nothing to train on"),
    (_msgs(USER, {**BOT, "weight": 0}, USER, {**BOT, "weight": 0}), "messages", "every assistant message has weight 0"),
    # OpenAI's preference (DPO) rows
    (_pref(input="Hi"), "input", "must be an object holding the conversation's messages, got a string"),
    (_pref(input={}), "input.messages", "missing"),
    (_pref(input={"messages": []}), "input.messages", "got an empty list"),
    (_pref(input={"messages": [USER], "tools": []}), "input.tools", "not supported"),
    (_pref(input={"messages": [USER], "parallel_tool_calls": False}), "input.parallel_tool_calls", "not supported"),
    (_pref(input={"messages": [USER], "extra": 1}), "input.extra", "unknown key in a preference input"),
    (_pref(input={"messages": [USER, BOT]}), "input.messages[1].role", "the last input message must be the user's"),
    (_pref(input={"messages": [{"role": "tool", "content": "x"}]}), "input.messages[0].role", "must be one of"),
    (_pref(input={"messages": [{**USER, "weight": 1}]}), "input.messages[0].weight", "unknown key in a message"),
    (_pref(input={"messages": [{"role": "user", "content": 3}]}), "input.messages[0].content", "must be a string"),
    (_pref(preferred_output={"role": "assistant", "content": "x"}), "preferred_output",
     "must be a list of exactly one assistant message, got an object"),
    (_pref(preferred_output=[]), "preferred_output", "got a list of 0 messages"),
    (_pref(non_preferred_output=[BOT, BOT]), "non_preferred_output", "got a list of 2 messages"),
    (_pref(preferred_output=[{"role": "user", "content": "x"}]), "preferred_output[0].role",
     "must be assistant; got 'user'"),
    (_pref(preferred_output=[{"role": "assistant", "content": ""}]), "preferred_output[0].content", "is empty"),
    (_pref(non_preferred_output=[{"role": "assistant"}]), "non_preferred_output[0].content", "missing"),
    (_pref(non_preferred_output=[{**BOT, "weight": 1}]), "non_preferred_output[0].weight",
     "unknown key in an output message"),
    (_pref(non_preferred_output=["Hello"]), "non_preferred_output[0]", "expected an object"),
    (_pref(non_preferred_output=PREF["preferred_output"]), "non_preferred_output[0].content",
     "is the same as preferred_output's"),
    (_pref(drop="non_preferred_output"), "non_preferred_output", "missing"),
    (_pref(drop="input"), "input", "missing"),
    (_pref(score=1), "score", "unknown key in a preference row"),
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


def test_every_problem_of_a_preference_row_is_reported(tmp_path):
    row = {"input": {"messages": [BOT], "tools": [{}]}, "preferred_output": [{"role": "user", "content": ""}],
           "non_preferred_output": "no"}
    with pytest.raises(DataError) as info:
        read_jsonl(write_jsonl(tmp_path / "p.jsonl", [PREF, row]), name="prefs.jsonl")
    shown = [str(e) for e in info.value.errors]
    assert shown == [
        "prefs.jsonl:2: input.tools: not supported: tool calls are not trained here (remove it, with any tool "
        "messages)",
        "prefs.jsonl:2: input.messages[0].role: the last input message must be the user's (the outputs answer it); "
        "got assistant",
        "prefs.jsonl:2: preferred_output[0].role: must be assistant; got 'user'",
        "prefs.jsonl:2: preferred_output[0].content: is empty",
        "prefs.jsonl:2: non_preferred_output: must be a list of exactly one assistant message, got a string",
    ]


def test_preference_and_chat_rows_do_not_mix(tmp_path):
    with pytest.raises(DataError) as info:
        read_jsonl(write_jsonl(tmp_path / "m.jsonl", [PREF, CHAT]), name="m.jsonl")
    assert str(info.value.errors[0]) == ("m.jsonl:2: a messages row in a preference file (line 1 set the format); "
                                         "every row must use the same format")


def test_method_and_format_must_agree(tmp_path):
    from tunery.data import check_method

    prefs = read_jsonl(write_jsonl(tmp_path / "p.jsonl", [PREF]), name="prefs.jsonl")
    chats = read_jsonl(write_jsonl(tmp_path / "c.jsonl", [CHAT]), name="chats.jsonl")
    check_method("dpo", prefs)
    check_method("sft", chats)
    with pytest.raises(TuneryError) as info:
        check_method("sft", prefs)
    assert str(info.value) == ("prefs.jsonl (train_data) has preference rows, which train with method=dpo; "
                               "method=sft trains on text, prompt/completion or chat rows")
    with pytest.raises(TuneryError, match=r"^chats.jsonl \(validation_data\) has messages rows, but method=dpo "
                                          r"trains on preference rows"):
        check_method("dpo", chats, "validation_data")
