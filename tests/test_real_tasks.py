"""The quality benchmark's real tasks (benchmarks/real_tasks.py): read from the packages that ship
them, the sizes asked for, valid training data, and no test row's source seen in training."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_tasks  # noqa: E402


def _passage(prompt: str) -> str:
    return re.search(r"Passage: (.*)\nQuestion:", prompt).group(1)


@pytest.mark.parametrize("task", list(real_tasks.METRICS))
def test_real_task_splits(task, tmp_path):
    from conftest import write_jsonl
    from tunery.data import read_jsonl

    train, test = real_tasks.splits(task, 240, 50, seed=0)
    assert len(train) == 240 and len(test) == 50
    assert real_tasks.splits(task, 240, 50, seed=0) == (train, test)  # the fixed seed reproduces it
    assert real_tasks.splits(task, 240, 50, seed=1)[1] != test
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert read_jsonl(write_jsonl(tmp_path / "t.jsonl", train)).format == "prompt_completion"
    if task == "reviews":
        assert {r["completion"] for r in train + test} == {" fresh", " rotten"}
    if task == "squad":  # an answer is a span of its passage, and no test passage is trained on
        assert all(r["completion"].strip() in _passage(r["prompt"]) for r in train + test)
        assert not {_passage(r["prompt"]) for r in train} & {_passage(r["prompt"]) for r in test}
        assert len({_passage(r["prompt"]) for r in test}) >= 10
    if task == "headlines":
        assert len({r["completion"] for r in test}) == 50


def test_paired_interval_over_test_rows():
    """The quality benchmark's interval for a difference to the plain script: over test rows,
    paired, each row averaged over the seeds both arms ran."""
    from common import paired_interval

    plain = [[1.0, 0.0, 1.0, 0.0] * 25, [1.0, 0.0, 0.0, 0.0] * 25]
    assert paired_interval(plain, plain) == (0.0, 0.0)
    better = [[1.0] * 100, [1.0] * 100]
    assert paired_interval(better, [[0.0] * 100]) == (1.0, 1.0)
    low, high = paired_interval([[1.0, 1.0, 1.0, 0.0] * 25], plain)
    mean = 0.75 - (0.5 + 0.25) / 2
    assert low < mean < high and high - low < 0.4
    assert paired_interval([[1.0, 1.0, 1.0, 0.0] * 25], plain) == (low, high)  # a fixed resampling seed
