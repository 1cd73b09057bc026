"""The HTTP service: Replicate's /v1 API (FastAPI) over the store, with predictions run in the
server process and trainings run by workers. `create_app` builds it; `tunery serve` runs it.

Importing this package imports neither torch nor the app: `tunery train` registers the server's
commands (tunery.server.cli) without paying for FastAPI, the store and the three APIs."""

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from tunery.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
