"""The /v1 routers, one module per kind of object."""

from tunery.server.routes import account, bases, files, models, predictions, trainings

ROUTERS = [models.router, trainings.router, files.router, predictions.router, account.router,
           bases.router]

__all__ = ["ROUTERS"]
