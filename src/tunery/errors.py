"""Errors a user can act on. Each one's message names what was wrong and where."""

from __future__ import annotations

from dataclasses import dataclass


class TuneryError(Exception):
    """Base for every error tunery reports to a user (CLI exit code 2, HTTP 4xx)."""


class SpecError(TuneryError):
    """A training input is invalid (unknown key, wrong type, out of range, inconsistent)."""


class ModelNotFoundError(TuneryError):
    """A base model could not be resolved; the message lists everything that was tried."""


@dataclass(frozen=True)
class LineError:
    """One problem in one line of a JSONL file."""

    path: str
    line: int
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}"
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"

    def as_dict(self) -> dict:
        return {"file": self.path, "line": self.line, "field": self.field, "reason": self.reason}


class DataError(TuneryError):
    """A data file failed validation. Holds every line error found (the message shows the first 20)."""

    SHOWN = 20

    def __init__(self, errors: list[LineError], summary: str | None = None):
        self.errors = list(errors)
        self.summary = summary
        super().__init__(self._render())

    def _render(self) -> str:
        lines = []
        if self.summary:
            lines.append(self.summary)
        lines += [str(e) for e in self.errors[: self.SHOWN]]
        if len(self.errors) > self.SHOWN:
            lines.append(f"... and {len(self.errors) - self.SHOWN} more bad lines")
        return "\n".join(lines)
