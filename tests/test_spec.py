"""The typed training inputs: every problem of a request is reported at once."""

from __future__ import annotations

import pytest

from tunery.errors import SpecError
from tunery.spec import input_errors, parse_inputs


def fields(data):
    return [e.field for e in input_errors(data)]


def test_valid_inputs_have_no_errors():
    assert input_errors({"train_data": "d.jsonl", "train_batch_size": 8, "micro_batch_size": 2}) == []


def test_field_errors_and_cross_field_errors_come_together():
    errors = input_errors({"train_data": "d.jsonl", "lora_dropout": -1, "micro_batch_size": 3,
                           "wrap_packed_sequences": True, "bogus": 1})
    assert [e.field for e in errors] == ["lora_dropout", "bogus", "micro_batch_size", "wrap_packed_sequences"]
    by_field = {e.field: e.reason for e in errors}
    assert by_field["micro_batch_size"] == "micro_batch_size (3) must divide train_batch_size (4)"
    assert by_field["bogus"] == "unknown input (not a training input of this model)"


def test_a_cross_field_check_is_skipped_when_a_field_it_reads_is_itself_bad():
    # chunk_size is invalid, so "max_seq_length cannot exceed chunk_size" cannot be judged
    assert fields({"train_data": "d", "max_seq_length": 4096, "pack_sequences": True, "chunk_size": "big"}) == [
        "chunk_size"]
    assert fields({"train_data": "d", "micro_batch_size": "x", "train_batch_size": 8}) == ["micro_batch_size"]


def test_cross_field_checks_use_the_coerced_values_and_defaults():
    assert fields({"train_data": "d", "train_batch_size": "6"}) == ["micro_batch_size"]
    assert fields({"train_data": "d", "max_seq_length": 4096, "pack_sequences": True, "chunk_size": 1024}) == [
        "max_seq_length"]
    assert fields({"micro_batch_size": 3}) == ["train_data", "micro_batch_size"]


def test_not_an_object():
    assert fields([1, 2]) == ["input"]


def test_parse_inputs_names_everything_in_one_message():
    with pytest.raises(SpecError) as info:
        parse_inputs({"train_data": "d", "seed": "x", "micro_batch_size": 3})
    assert str(info.value) == ("invalid training input: seed: Input should be a valid integer, unable to parse "
                               "string as an integer; micro_batch_size (3) must divide train_batch_size (4)")


def test_loraplus_is_off_by_default_for_every_method_and_an_explicit_ratio_wins():
    # Plain LoRA unless asked: on real data LoRA+ forgot more and scored no better (benchmarks/quality.py).
    for method in ("sft", "dpo", "grpo"):
        extra = {"grader": '{"type": "string_check", "name": "g", "input": "{{sample.output_text}}", '
                           '"reference": "x", "operation": "eq"}'} if method == "grpo" else {}
        inputs = parse_inputs({"train_data": "d.jsonl", "method": method, **extra})
        assert inputs.loraplus_lr_ratio == 1 and inputs.model_dump()["loraplus_lr_ratio"] == 1
    assert parse_inputs({"train_data": "d.jsonl", "loraplus_lr_ratio": 16}).loraplus_lr_ratio == 16
    with pytest.raises(SpecError, match="loraplus_lr_ratio"):
        parse_inputs({"train_data": "d.jsonl", "loraplus_lr_ratio": 0.5})
