"""OpenAI's API under /openai/v1 (inference: models, chat/completions, completions; fine-tuning:
files, jobs, events, checkpoints, model deletion, graders), on the same tokens and the same service as
Replicate's, with OpenAI's shapes and error objects."""

from fastapi import FastAPI

from tunery.server.openai import errors, files, fine_tuning, graders, inference

ROUTERS = [inference.router, files.router, fine_tuning.router, graders.router]


def install(app: FastAPI) -> None:
    """OpenAI's error object for everything under its prefix."""
    errors.install(app)


__all__ = ["ROUTERS", "install"]
