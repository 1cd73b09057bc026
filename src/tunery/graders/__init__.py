"""Graders: OpenAI's grader JSON (string_check, text_similarity, python, score_model, multi), parsed,
checked and run on sampled answers. The reward of reinforcement fine-tuning (method grpo), the
graders API (`/openai/v1/fine_tuning/alpha/graders/validate` and `/run`) and `tunery eval` on an
RFT file all score through here.

    from tunery.graders import load_grader, grade
    grader = load_grader({"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
                          "reference": "{{ item.answer }}", "operation": "eq"})
    grade(grader, "42", {"answer": "42"}).reward  # 1.0
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunery.graders.grade import ERROR_FLAGS, Judge, Outcome, check_grader, grade, grade_many, item_problems
from tunery.graders.sandbox import Limits, SandboxUnavailable
from tunery.graders.spec import GraderError, MultiGrader, parse_grader, walk

__all__ = ["ERROR_FLAGS", "GraderError", "Judge", "Limits", "MultiGrader", "Outcome", "SandboxUnavailable",
           "check_grader", "grade", "grade_many", "item_problems", "load_grader", "parse_grader", "read_grader",
           "row_errors", "walk"]


def load_grader(obj: Any, *, check: bool = True, limits: Limits = Limits(), has_model=None, field: str = "grader",
                training: bool = False):
    """The grader `obj` (its JSON, parsed) describes, checked (check_grader) unless `check` is false;
    with `training`, a score_model grader anywhere in it is refused (_refuse_judges)."""
    grader = parse_grader(obj, field=field)
    if training:
        _refuse_judges(grader, field)
    if check:
        check_grader(grader, limits=limits, has_model=has_model, where=field)
    return grader


def _refuse_judges(grader, where: str) -> None:
    """GraderError for a score_model grader in a training: its judge runs on the server's engines
    (the graders API), which a training's process does not reach yet."""
    from tunery.graders.spec import ScoreModelGrader

    for path, g in walk(grader, where):
        if isinstance(g, ScoreModelGrader):
            raise GraderError("a score_model grader judges through the server's graders API (/run); training "
                              "with one is not supported yet: use string_check, text_similarity, python or multi",
                              field=f"{path}.type")


def row_errors(grader, dataset, *, where: str = "grader") -> list:
    """One LineError per row of an RFT dataset (data.jsonl.Dataset) lacking a field the grader reads."""
    from tunery.errors import LineError

    out = []
    for row, line in zip(dataset.rows, dataset.lines, strict=True):
        problems = item_problems(grader, row, where=where)
        if problems:
            out.append(LineError(dataset.name, line, None, "; ".join(problems)))
    return out


def read_grader(path: str | Path, **kwargs):
    """A grader from a JSON file (`--grader grader.json`): the grader itself, or {"grader": {...}}."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except OSError as exc:
        raise GraderError(f"cannot read {p}: {exc.strerror}", field=str(p)) from None
    except ValueError as exc:
        raise GraderError(f"{p} is not JSON: {exc}", field=str(p)) from None
    if isinstance(obj, dict) and set(obj) == {"grader"}:
        obj = obj["grader"]
    return load_grader(obj, **kwargs)
