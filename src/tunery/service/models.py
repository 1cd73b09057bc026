"""Deleting models and versions, for every API (Replicate's DELETEs, OpenAI's `ft:` model delete):
the rows, their predictions, their weights in storage and on the serving engines.

A version's weights are its run (a service training's folder in storage) or one checkpoint of it
(`keep_checkpoints_as_versions`, OpenAI's checkpoint models). Deleting a version deletes its own
weights: a checkpoint folder, or, for a run's final weights, the whole run once no other version
lives in it (else its final weights only: the adapter or model, and the archive). Refused while a
training that has not ended writes to the model or trains from the version, and when other
owners ran predictions on it (their records would lose what they ran, as on Replicate)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tunery.artifacts.run import ADAPTER, ARCHIVE, CHECKPOINTS, MODEL, is_url, split_checkpoint
from tunery.service import predictions
from tunery.service.errors import Conflict, Forbidden
from tunery.settings import Settings
from tunery.store.models import Model, Version
from tunery.store.store import Store

if TYPE_CHECKING:
    from tunery.service.prediction_runner import PredictionRunner

log = logging.getLogger("tunery.service.models")


def delete_model(store: Store, settings: Settings, runner: PredictionRunner | None, owner: str, model: Model) -> None:
    """Delete the caller's model with every version (and their weights)."""
    _delete(store, settings, runner, owner, model, store.all_versions(model.id), drop_model=True)


def delete_version(store: Store, settings: Settings, runner: PredictionRunner | None, owner: str, model: Model,
                   version: Version) -> None:
    """Delete one version of the caller's model (and its weights)."""
    _delete(store, settings, runner, owner, model, [version], drop_model=False)


def _delete(store: Store, settings: Settings, runner: PredictionRunner | None, owner: str, model: Model,
            versions: list[Version], *, drop_model: bool) -> None:
    name = f"{model.owner}/{model.name}"
    if model.is_base:
        raise Forbidden(f"{name} is a base model: remove it with `tunery bases remove` on the server")
    if model.owner != owner:
        raise Forbidden(f"{name} is not yours to delete (you can only delete your own models)")
    ids = [v.id for v in versions]
    writing, foreign = store.blocking_deletion(name, ids, owner)
    if writing:
        shown = ", ".join(f"{t.id} ({t.status})" for t in writing[:5])
        raise Conflict(f"{name} can not be deleted while a training writes to it or trains from it: {shown}; "
                       "cancel it or wait for it to end")
    if foreign:
        raise Conflict(f"{name}: other owners ran {foreign} predictions on "
                       f"{'its versions' if drop_model else 'this version'}; it can not be deleted")
    weights = [_local_weights(settings, v) for v in versions]
    store.delete_versions(model.id, ids, drop_model=drop_model)
    for version in versions:
        if version.run_url:
            _delete_weights(store, settings, version.run_url)
    for version, found in zip(versions, weights, strict=True):
        predictions.forget_tokenizer(version)
        if runner is not None and found is not None:
            runner.forget_weights(found)


def _local_weights(settings: Settings, version: Version):
    """The version's weights as the engines hold them (None when there are none, or they are gone).
    A run in storage that this server never fetched is on none of its engines: not fetched now."""
    if not version.run_url:
        return None
    checkpoint = split_checkpoint(version.run_url)
    if is_url(version.run_url) and not settings.run(checkpoint[0] if checkpoint else version.run_url).work.exists():
        return None
    from tunery.errors import TuneryError
    from tunery.infer.weights import resolve_weights

    try:
        return resolve_weights(version.run_url, settings)
    except TuneryError:
        return None


def _delete_weights(store: Store, settings: Settings, url: str) -> None:
    """Remove what only this version used: a checkpoint folder, or the run (its final weights only,
    while checkpoint versions of it remain)."""
    checkpoint = split_checkpoint(url)
    root = checkpoint[0] if checkpoint else url
    run = settings.run(root)
    try:
        if checkpoint is not None:
            run.remove(f"{CHECKPOINTS}/{checkpoint[1]}")
        elif store.versions_in_run(root):
            for name in (ADAPTER, MODEL, ARCHIVE):
                run.remove(name)
        else:
            run.delete()
        if checkpoint is not None and not store.versions_in_run(root) and not run.exists(ADAPTER) \
                and not run.exists(MODEL):
            run.delete()  # its last checkpoint version went, and its final weights went before
    except Exception as exc:  # the rows are gone already; say what is left behind
        log.warning("deleting the weights at %s failed (%s): remove them from the storage by hand", url, exc)

