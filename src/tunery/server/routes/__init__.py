"""The /v1 routers, one module per kind of object; OpenAI's API under /openai/v1; Azure ML's scoring."""

from tunery.server.routes import (
    account,
    azure,
    bases,
    files,
    models,
    openai,
    openai_fine_tuning,
    predictions,
    trainings,
)

ROUTERS = [models.router, trainings.router, files.router, predictions.router, account.router,
           bases.router, openai.router, openai_fine_tuning.router, azure.router]

__all__ = ["ROUTERS"]
