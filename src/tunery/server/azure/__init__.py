"""Azure ML's scoring schema for text generation, on a version (see scoring.py)."""

from tunery.server.azure import scoring

ROUTERS = [scoring.router]

__all__ = ["ROUTERS"]
