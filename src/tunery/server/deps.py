"""The typed dependencies the routes of every API declare: settings, store, prediction runner,
exports, the public base URL, the authenticated owner, list paging, and the model and version a
path names. Routes take these and nothing global."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import Depends, Query, Request

from tunery.server.errors import ApiError, not_found
from tunery.service.errors import Busy
from tunery.service.exports import Exports
from tunery.service.prediction_runner import PredictionRunner
from tunery.settings import Settings
from tunery.store.models import Model, Version
from tunery.store.pages import Page
from tunery.store.store import Store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_runner(request: Request) -> PredictionRunner:
    return request.app.state.runner


def get_exports(request: Request) -> Exports:
    return request.app.state.exports


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
RunnerDep = Annotated[PredictionRunner, Depends(get_runner)]
ExportsDep = Annotated[Exports, Depends(get_exports)]


def public_base_url(request: Request, settings: SettingsDep) -> str:
    """Where clients reach this server, without a trailing slash: settings.public_url when set
    (behind a proxy), else the scheme and host the request came in on."""
    return (settings.public_url or str(request.base_url)).rstrip("/")


BaseUrl = Annotated[str, Depends(public_base_url)]

_SCHEMES = ("bearer", "token")


#: Writes that only run a model (the `predict` scope); every other write needs `train`.
_PREDICT = re.compile(r"^/v1/(predictions(/[^/]+/cancel)?|models/[^/]+/[^/]+/(predictions|score|versions/[^/]+/score))$"
                      r"|^/openai/v1/(chat/)?completions$")


def required_scope(method: str, path: str) -> str:
    """The scope a request needs: `read` for GET and HEAD, `predict` to run a model (Replicate's
    predictions and their cancel, OpenAI's completions, Azure's scoring), `train` for every other
    write. Routes for operators need `admin` as well (AdminOwner)."""
    if method in ("GET", "HEAD", "OPTIONS"):
        return "read"
    return "predict" if _PREDICT.match(path) else "train"


def current_owner(request: Request, store: StoreDep, runner: RunnerDep) -> str:
    """The owner whose token authorizes this request (`Authorization: Bearer <token>` or
    `Token <token>`). A missing, malformed, unknown, revoked or expired token is refused with a
    401, a token without the scope the request needs (`required_scope`) with a 403, and a request
    beyond the owner's requests per minute with a 429 and Retry-After, each in the shape of the
    API asked (OpenAI's under /openai/)."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    token = token.strip() if scheme.lower() in _SCHEMES else ""
    check = store.authenticate(token) if token else None
    if check is None or check.owner is None:
        # Replicate's words first (clients and the dashboard know them), then why.
        why = "" if check is None else f" (this token is {check.refused})"
        message = (f"You did not pass a valid authentication token{why}: send 'Authorization: Bearer <token>' "
                   "(create one with `tunery tokens create --owner NAME`)")
        raise _refusal(request, 401, message, "invalid_api_key", "Unauthenticated")
    request.state.scopes = check.scopes
    needed = required_scope(request.method, request.url.path)
    if needed not in check.scopes:
        raise _refusal(request, 403, f"This token may not {request.method} {request.url.path}: that needs the "
                       f"{needed!r} scope, and the token has {', '.join(sorted(check.scopes))}",
                       "insufficient_scope", "Forbidden")
    try:
        request.app.state.rate.hit(check.owner, runner.limits.get(check.owner).requests_per_minute)
    except Busy as exc:
        raise _refusal(request, 429, exc.message, "rate_limit_exceeded", "Request was throttled",
                       retry_after=exc.retry_after) from None
    return check.owner


def _refusal(request: Request, status: int, message: str, code: str, title: str, *,
             retry_after: float | None = None) -> Exception:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if retry_after is not None:
        headers = {"Retry-After": str(max(1, round(retry_after)))}
    if request.url.path.startswith("/openai/"):
        from tunery.server.openai.errors import OpenAIError

        kind = "requests" if status == 429 else "invalid_request_error"
        return OpenAIError(status, message, type=kind, code=code, headers=headers)
    return ApiError(status, message, title=title, headers=headers)


Owner = Annotated[str, Depends(current_owner)]


def admin_owner(request: Request, owner: Owner, settings: SettingsDep) -> str:
    """The authenticated owner, if settings.admin_owners names it and the token has the `admin`
    scope; else a 403 problem saying how an operator makes someone an administrator."""
    if "admin" not in getattr(request.state, "scopes", frozenset()):
        raise ApiError(403, "this token lacks the 'admin' scope that operators' routes need", title="Forbidden")
    if owner not in settings.admins:
        configured = "it does not name you" if settings.admins else "none is set"
        raise ApiError(
            403,
            f"owner {owner!r} is not an administrator: only the owners listed in TUNERY_ADMIN_OWNERS "
            f"(the admin_owners setting) may do this, and {configured}",
            title="Forbidden",
        )
    return owner


AdminOwner = Annotated[str, Depends(admin_owner)]


class Paging:
    """The `cursor` and `limit` of a list request, and the rendering of a store Page as
    Replicate's `{"next", "previous", "results"}` with absolute URLs the client follows as given."""

    def __init__(
        self,
        request: Request,
        base: BaseUrl,
        cursor: Annotated[str | None, Query(description="Opaque cursor from a previous page's URLs.")] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="Results per page.")] = 100,
    ):
        self.cursor = cursor
        self.limit = limit
        self._url = base + request.url.path
        # The other query parameters (limit, view, ...) carry over to the next/previous links.
        self._keep = {k: v for k, v in request.query_params.items() if k != "cursor"}

    def render(self, page: Page, item: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return {
            "next": self._link(page.next_cursor),
            "previous": self._link(page.previous_cursor),
            "results": [item(row) for row in page.items],
        }

    def _link(self, cursor: str | None) -> str | None:
        if cursor is None:
            return None
        query = {"cursor": cursor} | self._keep
        return f"{self._url}?{urlencode(query)}"


PagingDep = Annotated[Paging, Depends()]


def own_hosts(request: Request, base: BaseUrl) -> set[str]:
    """The host[:port] names this server is reached by (its public URL's and this request's), to
    recognise URLs that point back at it."""
    return {urlsplit(base).netloc, request.url.netloc}


OwnHosts = Annotated[set[str], Depends(own_hosts)]


def path_model(model_owner: str, model_name: str, owner: Owner, store: StoreDep) -> Model:
    """The model named by the path, if the caller may see it (its own, or public); else 404."""
    model = store.get_model(owner, model_owner, model_name)
    if model is None:
        raise not_found(f"model {model_owner}/{model_name}")
    return model


PathModel = Annotated[Model, Depends(path_model)]


def path_version(model: PathModel, version_id: str, store: StoreDep) -> Version:
    """The version named by the path, of the path's model; else 404."""
    version = store.get_version(model.id, version_id)
    if version is None:
        raise not_found(f"version {model.owner}/{model.name}:{version_id}")
    return version


PathVersion = Annotated[Version, Depends(path_version)]
