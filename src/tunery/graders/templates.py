"""OpenAI's grader templates: `{{ item.field }}` and `{{ sample.output_text }}` substituted into a
string, with JSON-path-like access to nested values (`{{ item.answer.value }}`, `{{ item.steps[0] }}`).

Nothing else is a template here: no statements, filters or calls, so rendering a user's template
costs only the lookups it names. A string value goes in as it is, anything else as JSON."""

from __future__ import annotations

import json
import re
from typing import Any

NAMESPACES = ("item", "sample")
_TAG = re.compile(r"\{\{(.*?)\}\}", re.S)
_PATH = re.compile(r"\s*(item|sample)((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\s*(?:\d+|'[^']*'|\"[^\"]*\")\s*\])*)\s*$")
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[\s*(\d+|'[^']*'|\"[^\"]*\")\s*\]")


class TemplateError(ValueError):
    """A template that names something it may not, or a value the data does not have."""


def references(template: str) -> list[tuple[str, tuple[str | int, ...]]]:
    """(namespace, path) for each substitution in `template`; TemplateError for one that is not
    `{{ item.… }}` or `{{ sample.… }}`."""
    found = []
    for match in _TAG.finditer(template):
        path = _PATH.match(match.group(1))
        if path is None:
            raise TemplateError(f"{match.group(0)!r} is not a substitution this grader understands: write "
                                "{{ item.field }} or {{ sample.output_text }} (nested: {{ item.a.b }}, {{ item.list[0] }})")
        steps: list[str | int] = []
        for key, index in _STEP.findall(path.group(2)):
            steps.append(key if key else (int(index) if index.isdigit() else index[1:-1]))
        found.append((path.group(1), tuple(steps)))
    return found


def lookup(namespace: str, steps: tuple[str | int, ...], values: dict[str, Any]) -> Any:
    value: Any = values[namespace]
    where = namespace
    for step in steps:
        if isinstance(step, int):
            if not isinstance(value, list) or not -len(value) <= step < len(value):
                raise TemplateError(f"{where} has no item [{step}]")
            value = value[step]
            where += f"[{step}]"
        else:
            if not isinstance(value, dict) or step not in value:
                raise TemplateError(f"{where} has no field {step!r}")
            value = value[step]
            where += f".{step}"
    return value


def render(template: str, values: dict[str, Any]) -> str:
    """`template` with its substitutions filled from `values` ({"item": ..., "sample": ...})."""

    def fill(match: re.Match) -> str:
        (namespace, steps), = references(match.group(0))
        value = lookup(namespace, steps, values)
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    return _TAG.sub(fill, template)


def resolve(template: str, values: dict[str, Any]) -> Any:
    """A template that is one substitution and nothing else gives the value itself (a number stays a
    number, a list a list), as a python grader or a comparison would want it; else `render`."""
    tags = list(_TAG.finditer(template))
    if len(tags) == 1 and tags[0].group(0) == template.strip():
        (namespace, steps), = references(template)
        return lookup(namespace, steps, values)
    return render(template, values)


def sample_values(output_text: str, *, want_json: bool = False) -> dict[str, Any]:
    """The sample namespace for one sampled answer: output_text, and output_json when the text is
    JSON (always tried when `want_json`, the job's response_format being a JSON schema; otherwise
    only text that starts like JSON)."""
    sample: dict[str, Any] = {"output_text": output_text, "output_json": None, "output_tools": []}
    text = output_text.strip()
    if want_json or text[:1] in ("{", "["):
        try:
            sample["output_json"] = json.loads(text)
        except ValueError:
            pass
    return sample
