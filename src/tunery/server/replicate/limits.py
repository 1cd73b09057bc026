"""Per-owner limits: the caller's own (what applies and what is in use), and the operators'
routes (admin scope, an owner in TUNERY_ADMIN_OWNERS) to list and change anyone's; owner `*`
is everyone's."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from tunery.server.deps import AdminOwner, Owner, RunnerDep, StoreDep
from tunery.service import limits

router = APIRouter(tags=["limits"])

_VALUE = "a whole number >= 0 (0: no limit), 'default' (fall through to everyone's, then built in), or absent: unchanged"


class LimitsChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trainings: int | str | None = Field(None, description=f"Trainings running at once: {_VALUE}.")
    queued_trainings: int | str | None = Field(None, description=f"Trainings queued at once: {_VALUE}.")
    predictions: int | str | None = Field(None, description=f"Predictions at once on one server: {_VALUE}.")
    requests_per_minute: int | str | None = Field(None, description=f"Requests per minute on one server: {_VALUE}.")


@router.get("/v1/account/limits")
def my_limits(owner: Owner, store: StoreDep, runner: RunnerDep) -> dict[str, Any]:
    """The caller's limits, where each comes from, and what is in use now (this server's
    predictions; every worker's trainings)."""
    counts = store.training_counts(owner)
    return limits.record(store, owner) | {"in_use": {"trainings": counts["running"], "queued_trainings":
                                                    counts["queued"], "predictions": runner.held(owner)}}


@router.get("/v1/limits")
def list_limits(_admin: AdminOwner, store: StoreDep) -> dict[str, Any]:
    """Everyone's limits (owner `*`), then each owner's with limits of their own."""
    return {"results": limits.records(store)}


@router.patch("/v1/limits/{owner}")
def change_limits(owner: str, body: LimitsChange, _admin: AdminOwner, store: StoreDep,
                  runner: RunnerDep) -> dict[str, Any]:
    """Change an owner's limits (`*`: everyone's); what applies to them now. Servers apply a change
    within seconds (each reads limits again after a few seconds)."""
    record = limits.set_limits(store, owner, body.model_dump(exclude_none=True))
    runner.limits.forget()
    return record
