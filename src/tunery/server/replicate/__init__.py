"""Replicate's HTTP API under /v1: models and versions, trainings (and their exports), files,
predictions (polled, waited for, streamed), the account and its limits, and the operators' bases, tokens and limits. Each module
parses Replicate's shapes, calls `tunery.service` and renders the answer with `shapes`; errors
are problems (server/errors.py)."""

from tunery.server.replicate import account, bases, files, limits, models, predictions, tokens, trainings

ROUTERS = [models.router, trainings.router, files.router, predictions.router, account.router, limits.router,
           bases.router, tokens.router]

__all__ = ["ROUTERS"]
