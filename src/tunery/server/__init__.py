"""The HTTP service: Replicate's /v1 API (FastAPI) over the store, with predictions run in the
server process and trainings run by workers. `create_app` builds it; `tunery serve` runs it.

Importing this package does not import torch."""

from tunery.server.app import create_app

__all__ = ["create_app"]
