"""Check a training request completely before anything is queued.

`prepare_job` runs every check a worker would otherwise fail on minutes later: destination,
base version and that its files are there, the typed inputs, and the data itself (fetched, every line validated, enough rows
left to train on). It writes no row; it returns the `job` the worker runs (the validated inputs
with the data as local paths, plus the base model), or raises an ApiError naming every problem.
"""

from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tunery.artifacts.run import Job
from tunery.errors import DataError, ModelNotFoundError, TuneryError
from tunery.server.errors import ApiError, invalid, not_found
from tunery.server.schemas import TrainingCreate
from tunery.settings import Settings
from tunery.spec import TrainingInputs, format_input_errors, input_errors
from tunery.store.models import Model, Version
from tunery.store.store import Store

_FILE_PATH = re.compile(r"^/v1/files/([A-Za-z0-9]+)(?:/download)?/?$")
_MAX_LISTED = 1000  # line errors returned in one answer (the detail shows the first 20)


def prepare_job(
    store: Store,
    settings: Settings,
    *,
    owner: str,
    base: Model,
    version: Version,
    body: TrainingCreate,
    own_hosts: set[str],
) -> Job:
    """The job for a valid request to train `base` at `version`; raises ApiError otherwise.

    `own_hosts` are the host:port names this server answers to, so a URL of one of the caller's
    uploaded files is read from the storage instead of downloaded. Downloads go to a folder of
    this request's own (two trainings never share a downloaded file), removed again if it fails,
    and from there to the storage (where a worker on another machine reads them).
    """
    check_destination(store, owner, body.destination)
    if not base.is_base or version.run_url is not None:
        raise invalid(
            f"version {base.owner}/{base.name}:{version.id} is a trained version; "
            "train a base model's version (GET /v1/models lists them)"
        )
    check_base_loads(settings, base, version)
    inputs = parse_training_inputs(body.input)
    token = secrets.token_hex(8)
    downloads = settings.download_dir / token
    stored: list[str] = []
    try:
        data: dict[str, str] = {}
        fields = ["train_data"] + (["validation_data"] if inputs.validation_data and inputs.run_validation else [])
        found = {}
        for field in fields:
            source = getattr(inputs, field)
            found[field] = _resolve(store, settings, owner, field, source, own_hosts, downloads)
        _check_data(inputs, found["train_data"], found.get("validation_data"))
        for field, (path, _name, url) in found.items():
            if url is None:  # fetched now: into the storage, where the worker reads it
                url = settings.objects.put(path, f"data/{token}/{field}-{path.name[-80:]}")
                stored.append(url)
            data[field] = url
    except BaseException:
        for url in stored:
            settings.objects.delete(url)
        raise
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
    return Job(inputs=body.input, data=data, base=version.base_name)


def check_base_loads(settings: Settings, base: Model, version: Version) -> None:
    """A 422 naming the base and the reason when its files are missing (a registry model that
    was never downloaded, a registered directory deleted since); reads no weights."""
    from tunery.models.resolve import check_base

    try:
        check_base(version.base_name, settings, label=f"{base.owner}/{base.name}")
    except ModelNotFoundError as exc:
        raise invalid(str(exc), [{"field": "version", "reason": str(exc)}], title="Base model unavailable") from None


def check_destination(store: Store, owner: str, destination: str) -> Model:
    """The caller's own model named by `destination` ("owner/name"); 422 when malformed, 404
    when it does not exist or belongs to someone else."""
    dest_owner, slash, dest_name = destination.partition("/")
    if not slash or not dest_owner or not dest_name or "/" in dest_name:
        raise invalid(
            f"destination {destination!r} must be 'owner/name'",
            [{"field": "destination", "reason": "must be 'owner/name'"}],
        )
    model = store.get_model(owner, dest_owner, dest_name)
    if model is None or model.owner != owner or model.is_base:
        raise not_found(
            f"destination model {destination} (create it first with POST /v1/models; "
            "it must be one of your own models)"
        )
    return model


def parse_training_inputs(data: dict[str, Any]) -> TrainingInputs:
    """The typed inputs; a 422 listing every bad field (unknown, wrong type, out of range) and
    every inconsistency between fields otherwise."""
    if errors := input_errors(data):
        raise invalid(format_input_errors(errors), [{"field": e.field, "reason": e.reason} for e in errors],
                      title="Invalid training input")
    return TrainingInputs.model_validate(data)


def _resolve(
    store: Store,
    settings: Settings,
    owner: str,
    field: str,
    source: str,
    own_hosts: set[str],
    downloads: Path,
) -> tuple[Path, str, str | None]:
    """(local path, name for messages, URL a worker reads it from — None when it still has to
    be put in the storage) of a data source: one of the caller's uploaded files (by its URL), an
    http(s) URL (downloaded now, size-capped), or a local path if the server allows."""
    from tunery.data import fetch

    parts = urlsplit(source) if "://" in source else None
    if parts is not None and parts.scheme in ("http", "https"):
        own = _FILE_PATH.match(parts.path)
        if own and parts.netloc in own_hosts:
            row = store.get_file(owner, own.group(1))
            if row is None or not settings.objects.exists(row.path):
                raise invalid(
                    f"{field}: no file {own.group(1)} among your uploaded files",
                    [{"field": field, "reason": f"no uploaded file {own.group(1)}"}],
                )
            return settings.objects.get(row.path, settings.download_dir / "files"), row.name, row.path
        # Named in messages without credentials (user:password@, signed-URL query strings).
        shown = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
        try:
            path = fetch(source, downloads, max_bytes=settings.max_upload_bytes, allow_local=False)
        except TuneryError as exc:
            raise invalid(f"{field}: {exc}", [{"field": field, "reason": str(exc)}]) from None
        return path, shown, None
    if not settings.allow_local_paths:
        reason = (
            "local paths are not allowed on this server: upload the file with POST /v1/files and "
            "pass its URL, or give an http(s):// URL"
        )
        raise invalid(f"{field}: {reason}", [{"field": field, "reason": reason}])
    try:
        path = fetch(source, settings.download_dir, allow_local=True)
    except TuneryError as exc:
        raise invalid(f"{field}: {exc}", [{"field": field, "reason": str(exc)}]) from None
    return path, source, str(path)  # a path on a disk the workers share, read where it is


def _check_data(inputs: TrainingInputs, train: tuple, validation: tuple | None) -> None:
    """Every line of the data valid, and enough rows to train on; a 422 listing the problems."""
    from tunery.data import check_method, read_jsonl, split_train_validation

    datasets = []
    errors = []
    details = []
    for path, name, _url in [train] + ([validation] if validation else []):
        try:
            datasets.append(read_jsonl(path, name=name))
        except DataError as exc:
            errors += [e.as_dict() for e in exc.errors]
            details.append(str(exc))
        except TuneryError as exc:
            errors.append({"file": name, "line": None, "field": None, "reason": str(exc)})
            details.append(str(exc))
    if errors:
        raise ApiError(
            422,
            "invalid training data:\n" + "\n".join(details),
            title="Invalid training data",
            errors=errors[:_MAX_LISTED],
        )
    try:
        for ds, field in zip(datasets, ("train_data", "validation_data"), strict=False):
            check_method(inputs.method, ds, field)
    except TuneryError as exc:
        raise ApiError(
            422,
            str(exc),
            title="Invalid training data",
            errors=[{"file": ds.name, "line": None, "field": "method", "reason": str(exc)}],
        ) from None
    if validation and datasets[1].format != datasets[0].format:
        reason = (
            f"{validation[1]} has {datasets[1].format} rows but {train[1]} has {datasets[0].format} rows; "
            "training and validation data must use the same format"
        )
        raise ApiError(
            422,
            reason,
            title="Invalid training data",
            errors=[{"file": validation[1], "line": None, "field": "validation_data", "reason": reason}],
        )
    try:
        split_train_validation(
            datasets[0],
            datasets[1] if validation else None,
            num_validation_samples=inputs.num_validation_samples,
            run_validation=inputs.run_validation,
        )
    except TuneryError as exc:
        raise ApiError(
            422,
            str(exc),
            title="Invalid training data",
            errors=[{"file": train[1], "line": None, "field": "num_validation_samples", "reason": str(exc)}],
        ) from None
