"""The stop-sequence cutter and the sampling parameters: pure logic, no model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunery.infer.generation import SamplingParams
from tunery.infer.stops import StopCutter, parse_stop_sequences


def run_cutter(stops, pieces):
    """Feed `pieces` through a cutter; return (what each feed returned, the flush, the cutter)."""
    cutter = StopCutter(stops)
    outs = [cutter.feed(p) for p in pieces]
    return outs, cutter.flush(), cutter


def expected_cut(text: str, stops, bounds=None) -> str:
    """The text before the earliest stop in the shortest streamed prefix (ending at one of
    `bounds`, default: the whole text) that holds a complete stop: generation ends there."""
    for end in bounds or [len(text)]:
        hits = [text.find(s, 0, end) for s in stops if s and s in text[:end]]
        if hits:
            return text[: min(hits)]
    return text


def test_stop_split_across_pieces_is_held_then_cut():
    outs, tail, cutter = run_cutter(["<end>"], ["Hello <", "en", "d> world"])
    assert outs == ["Hello ", "", ""]
    assert tail == ""
    assert cutter.stopped and cutter.stop == "<end>"


def test_earliest_of_several_stops_wins():
    outs, tail, cutter = run_cutter(["###", "\n\n", "User:"], ["a\n", "\nb User: c ###"])
    assert "".join(outs) + tail == "a"
    assert cutter.stop == "\n\n"


def test_stop_at_the_very_start_gives_nothing():
    outs, tail, cutter = run_cutter(["Q:"], ["Q", ": what"])
    assert outs == ["", ""] and tail == "" and cutter.stopped


def test_prefix_that_is_not_a_stop_is_released():
    outs, tail, cutter = run_cutter(["<end>"], ["x <e", "nd", "ing> y"])
    assert outs == ["x ", "", "<ending> y"]
    assert not cutter.stopped


def test_pending_prefix_released_at_flush():
    outs, tail, _ = run_cutter(["<end>"], ["total <en"])
    assert outs == ["total "]
    assert tail == "<en"


def test_nothing_after_the_stop_even_in_later_pieces():
    outs, tail, _ = run_cutter(["STOP"], ["one STOP two", "three", "STOP"])
    assert outs == ["one ", "", ""] and tail == ""


def test_overlapping_stops_cut_at_the_earliest_start():
    # "ab" completes inside "xabc"; "bc" must not be what decides the cut.
    outs, tail, _ = run_cutter(["bc", "ab"], ["xa", "bc"])
    assert "".join(outs) + tail == "x"


def test_a_stop_that_completes_first_ends_the_text_though_a_longer_one_started_earlier():
    # Generation ends when "<" appears; "><<" would have started earlier but never completes.
    outs, tail, cutter = run_cutter(["<", "><<"], ["><", "<"])
    assert "".join(outs) + tail == ">" and cutter.stop == "<"
    # Given whole, both are complete at once and the earlier start wins.
    outs, tail, cutter = run_cutter(["<", "><<"], ["><<"])
    assert "".join(outs) + tail == "" and cutter.stop == "><<"


def test_no_stops_pass_everything_through():
    outs, tail, _ = run_cutter([], ["a", "", "b"])
    assert outs == ["a", "", "b"] and tail == ""


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab\n<>", max_size=40),
    stops=st.lists(st.text(alphabet="ab\n<>", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_any_split_gives_the_text_before_the_first_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    outs, tail, _ = run_cutter(stops, pieces)
    want = expected_cut(text, stops, bounds[1:])
    assert "".join(outs) + tail == want
    # Every released prefix is a prefix of the final output: nothing is ever taken back, so a
    # client never sees a partial stop or anything after one.
    shown = ""
    for out in outs:
        shown += out
        assert want.startswith(shown)
        assert not any(s in shown for s in stops)


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        (None, []),
        ("", []),
        ("<end>", ["<end>"]),
        ("<end>,###", ["<end>", "###"]),
        ("a,,b,", ["a", "b"]),
        (" Q:,\n", [" Q:", "\n"]),  # whitespace is meaningful, kept
        (["a,b", "c"], ["a,b", "c"]),  # a list allows commas inside a stop
        ("x,x", ["x"]),
    ],
)
def test_parse_stop_sequences(raw, parsed):
    assert parse_stop_sequences(raw) == parsed


def test_parse_stop_sequences_rejects_non_strings():
    with pytest.raises(ValueError, match="stop_sequences"):
        parse_stop_sequences(["a", 3])
    with pytest.raises(ValueError, match="stop_sequences"):
        parse_stop_sequences(5)


def test_sampling_defaults_follow_replicate():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (128, 0.75, 0.9, 50, None)
    assert not p.greedy


@pytest.mark.parametrize("temperature", [0, 0.0, 1e-6, 1e-5])
def test_tiny_temperature_means_greedy(temperature):
    p = SamplingParams(temperature=temperature)
    assert p.greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", True),
        ("seed", -1),
        ("seed", "7"),
        ("stop_sequences", 12),
    ],
)
def test_out_of_range_sampling_is_a_clear_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stops_property_parses_the_comma_string():
    assert SamplingParams(stop_sequences="<end>,\n\n").stops == ["<end>", "\n\n"]
