"""Every error the /v1 APIs (Replicate's, Azure's scoring, the dashboard's) answer is an RFC 7807
problem: `{"title", "detail", "status"}` served as application/problem+json (what the official
Replicate client parses into ReplicateError), plus an `errors` list where there is one problem
per field or per line of a file. The service's errors become problems here (`service_problem`);
OpenAI's API renders them its own way (server/openai/errors.py).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunery.service import errors as service
from tunery.store.pages import BadCursor

log = logging.getLogger("tunery.server")

PROBLEM = "application/problem+json"


class ApiError(Exception):
    """An error answered as a problem document. `errors` (optional) lists the individual
    problems: `{"field", "reason"}` for inputs, `{"file", "line", "field", "reason"}` for data."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.errors = errors
        self.headers = headers


def not_found(what: str) -> ApiError:
    """The 404 for an object that does not exist or that the caller may not see (the two are
    indistinguishable on purpose: another owner's ids are not disclosed)."""
    return ApiError(404, f"{what} not found", title="Not found")


def invalid(
    detail: str, errors: list[dict[str, Any]] | None = None, *, title: str = "Invalid input"
) -> ApiError:
    """A 422 for a request that is well-formed but cannot be accepted."""
    return ApiError(422, detail, title=title, errors=errors)


def problem(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The problem+json response for `status`."""
    body: dict[str, Any] = {"title": title or HTTPStatus(status).phrase, "detail": detail, "status": status}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def field_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic's error dicts as `{"field": "a.b", "reason": ...}`, dropping FastAPI's leading
    "body" so a field is named the way the client sent it."""
    out = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        if len(loc) > 1 and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        reason = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            reason = "unknown field"
        out.append({"field": ".".join(loc) or "body", "reason": reason})
    return out


#: The HTTP status of each kind of service error, in a problem.
STATUS: list[tuple[type[service.ServiceError], int]] = [
    (service.NotFound, 404), (service.Forbidden, 403), (service.Conflict, 409), (service.Busy, 429), (service.TooLarge, 413),
    (service.Invalid, 422), (service.ServiceError, 422),
]


def service_problem(exc: service.ServiceError) -> ApiError:
    """The problem a service error answers as: its status by kind, its title, message and list."""
    status = next(code for kind, code in STATUS if isinstance(exc, kind))
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, service.Busy) else None
    errors = exc.errors
    if errors is None and exc.field:  # one input at fault: named the way a list of them would be
        errors = [{"field": exc.field, "reason": exc.message}]
    return ApiError(status, exc.message, title=exc.title, errors=errors, headers=headers)


def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, service.ServiceError)
    error = service_problem(exc)
    return problem(error.status, error.detail, title=error.title, errors=error.errors, headers=error.headers)


def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return problem(exc.status, exc.detail, title=exc.title, errors=exc.errors, headers=exc.headers)


def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = "no such endpoint"
    return problem(exc.status_code, detail, headers=getattr(exc, "headers", None))


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = field_errors(list(exc.errors()))
    detail = "invalid request: " + "; ".join(f"{e['field']}: {e['reason']}" for e in errors)
    return problem(422, detail, title="Invalid request", errors=errors)


def _bad_cursor(_request: Request, exc: Exception) -> JSONResponse:
    return problem(400, str(exc), title="Invalid cursor")


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, f"internal error: {type(exc).__name__}: {exc}")


def install(app: FastAPI) -> None:
    """Answer every error of `app` (ours, FastAPI's validation, unknown routes, crashes) as a problem."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(service.ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(BadCursor, _bad_cursor)
    app.add_exception_handler(Exception, _unexpected)
