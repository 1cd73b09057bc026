"""The service's errors: what went wrong, in the service's words. Each API renders them in its own
shape (Replicate's problem+json, OpenAI's error object), with the status it uses for that kind.

`field` names the input at fault, in the service's names; `errors` lists the individual problems
when there are several: `{"field", "reason"}` for inputs, `{"file", "line", "field", "reason"}`
for the lines of a data file."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service refuses. `title` is a short heading (an API may show it)."""

    title = "Invalid input"

    def __init__(self, message: str, *, field: str | None = None, errors: list[dict[str, Any]] | None = None,
                 title: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.errors = errors
        if title is not None:
            self.title = title


class NotFound(ServiceError):
    """The object does not exist, or the caller may not see it (the two look the same on purpose)."""

    title = "Not found"


class Invalid(ServiceError):
    """Well-formed, but not acceptable: a bad input, a version that cannot be trained, ..."""


class InvalidData(Invalid):
    """Training data that cannot train: `errors` lists the bad lines (`{"file","line","field","reason"}`);
    `check` is the failed file check (files.DataCheck) when lines are bad, `reason` the problem
    without the file's name otherwise."""

    title = "Invalid training data"

    def __init__(self, message: str, *, field: str | None = None, errors: list[dict[str, Any]] | None = None,
                 check: Any = None, reason: str | None = None):
        super().__init__(message, field=field, errors=errors)
        self.check = check
        self.reason = reason


class Unavailable(Invalid):
    """A base model whose files are missing on this server."""

    title = "Base model unavailable"


class Forbidden(ServiceError):
    """The caller may see the object but not do this to it (delete a base model, say)."""

    title = "Forbidden"


class Conflict(ServiceError):
    """The object's state does not allow this (export an unfinished training, a taken name, ...)."""

    title = "Conflict"


class Busy(ServiceError):
    """The serving capacity, or one of the owner's limits (`code` "rate_limit_exceeded", OpenAI's
    name), is used up: try again after `retry_after` seconds."""

    title = "Request was throttled"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.code = code


class TooLarge(ServiceError):
    """An upload beyond the size limit."""

    title = "Payload too large"
