"""split_train_validation: Replicate's meaning of num_validation_samples and validation_data."""

from __future__ import annotations

import pytest

from tunery.data import Dataset, split_train_validation
from tunery.errors import TuneryError


def dataset(n: int, *, name: str = "train_data", fmt: str = "text") -> Dataset:
    if fmt == "text":
        rows = [{"text": f"{name} row {i}"} for i in range(n)]
    else:
        rows = [{"prompt": f"{name} {i}", "completion": " x"} for i in range(n)]
    return Dataset(
        path=f"/data/{name}.jsonl", name=name, format=fmt, rows=rows, lines=list(range(1, n + 1)), sha256="0"
    )


def test_without_a_validation_file_the_tail_validates():
    train = dataset(10)
    rows, val = split_train_validation(train, None, num_validation_samples=3, run_validation=True)
    assert rows == train.rows[:7]
    assert val == train.rows[7:]


def test_zero_validation_samples_keeps_every_row_for_training():
    train = dataset(4)
    rows, val = split_train_validation(train, None, num_validation_samples=0, run_validation=True)
    assert (rows, val) == (train.rows, [])


def test_a_validation_file_gives_its_head():
    train, validation = dataset(5), dataset(8, name="validation_data")
    rows, val = split_train_validation(train, validation, num_validation_samples=3, run_validation=True)
    assert rows == train.rows
    assert val == validation.rows[:3]
    _, val = split_train_validation(train, validation, num_validation_samples=50, run_validation=True)
    assert val == validation.rows


def test_too_few_rows_left_to_train_is_an_error_saying_what_to_do():
    with pytest.raises(TuneryError) as info:
        split_train_validation(dataset(30), None, num_validation_samples=50, run_validation=True)
    message = str(info.value)
    assert message.startswith(
        "train_data has 30 rows; num_validation_samples=50 would leave no training rows"
    )
    for fix in ("lower num_validation_samples", "pass validation_data", "run_validation=false"):
        assert fix in message

    with pytest.raises(TuneryError, match="no training rows"):
        split_train_validation(dataset(5), None, num_validation_samples=5, run_validation=True)
    with pytest.raises(TuneryError, match="only 2 training rows \\(at least 4 are needed\\)"):
        split_train_validation(
            dataset(5), None, num_validation_samples=3, run_validation=True, min_train_rows=4
        )
    rows, val = split_train_validation(dataset(5), None, num_validation_samples=4, run_validation=True)
    assert (len(rows), len(val)) == (1, 4)


def test_run_validation_false_trains_on_everything_and_ignores_validation_data():
    train = dataset(3)
    other_format = dataset(3, name="validation_data", fmt="prompt_completion")
    for validation in (None, other_format):
        rows, val = split_train_validation(train, validation, num_validation_samples=50, run_validation=False)
        assert (rows, val) == (train.rows, [])


def test_formats_of_train_and_validation_must_match():
    train = dataset(3)
    validation = dataset(3, name="val.jsonl", fmt="prompt_completion")
    with pytest.raises(TuneryError) as info:
        split_train_validation(train, validation, num_validation_samples=2, run_validation=True)
    message = str(info.value)
    assert "val.jsonl" in message and "train_data" in message
    assert "prompt_completion" in message and "text" in message


def test_the_result_is_fresh_lists():
    train = dataset(4)
    rows, _ = split_train_validation(train, None, num_validation_samples=1, run_validation=True)
    rows.clear()
    assert len(train.rows) == 4
