"""OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`) for everything under
/openai/v1: its own errors, bad request bodies, and the service's errors in OpenAI's words."""

from __future__ import annotations

import inspect

from fastapi import Request
from fastapi.responses import JSONResponse

from tunery.service import errors as service

PREFIX = "/openai/"


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


#: The HTTP status of each kind of service error, as OpenAI answers it.
STATUS: list[tuple[type[service.ServiceError], int]] = [
    (service.NotFound, 404), (service.Forbidden, 403), (service.Busy, 429), (service.TooLarge, 413), (service.ServiceError, 400),
]


def from_service(exc: service.ServiceError, *, param: str | None = None, code: str | None = None,
                 message: str | None = None) -> OpenAIError:
    """A service error as OpenAI answers it (`param` and `code` in OpenAI's names where known)."""
    status = next(code for kind, code in STATUS if isinstance(exc, kind))
    if isinstance(exc, service.Busy):
        retry = {"Retry-After": str(max(1, round(exc.retry_after)))}
        if exc.code is not None:  # one of the owner's limits, in OpenAI's words for a rate limit
            return OpenAIError(429, message or exc.message, type="requests", code=exc.code, headers=retry)
        return OpenAIError(429, message or "Too many requests in flight: try again shortly",
                           type="rate_limit_error", headers=retry)
    return OpenAIError(status, message or exc.message, param=param, code=code)


_UNION_TAGS = {"int", "float", "str", "bool", "none", "list", "dict"}


def _param(loc) -> str | None:
    """The parameter an error's location names (its body/query part dropped, and the union member tags
    pydantic adds, such as `literal['auto']` or `constrained-int`)."""
    parts = [str(p) for p in list(loc)[1:]
             if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p or "-" in p))]
    return ".".join(parts) or None


def install(app) -> None:
    """OpenAI's error shape under the prefix: for bad bodies, OpenAIError, and service errors."""
    from fastapi.exceptions import RequestValidationError

    previous = app.exception_handlers.get(RequestValidationError)

    async def handler(request: Request, exc: RequestValidationError):
        if request.url.path.startswith(PREFIX):
            errors = exc.errors()
            first = errors[0] if errors else {}
            param = _param(first.get("loc", []))
            # A value that fits none of a union's types ("auto" or a number) fails each of them.
            reasons = list(dict.fromkeys(e.get("msg", "invalid") for e in errors if _param(e.get("loc", [])) == param))
            message = f"{param or 'body'}: {', or '.join(reasons) or 'invalid request'}"
            return OpenAIError(400, message, param=param).response()
        if previous is None:
            return JSONResponse({"detail": exc.errors()}, status_code=422)
        answer = previous(request, exc)  # the /v1 handler: sync or async
        return await answer if inspect.isawaitable(answer) else answer

    app.add_exception_handler(RequestValidationError, handler)

    async def openai_error(request: Request, exc: Exception):
        assert isinstance(exc, OpenAIError)
        return exc.response()

    app.add_exception_handler(OpenAIError, openai_error)

    previous_service = app.exception_handlers.get(service.ServiceError)

    async def service_error(request: Request, exc: Exception):
        assert isinstance(exc, service.ServiceError)
        if request.url.path.startswith(PREFIX) or previous_service is None:
            return from_service(exc, param=exc.field).response()
        answer = previous_service(request, exc)
        return await answer if inspect.isawaitable(answer) else answer

    app.add_exception_handler(service.ServiceError, service_error)
