"""Operators' own base models: registered from a model directory, a `.gguf` file, a Hugging Face
id already in the local cache, or a storage URL, then listed, trained and predicted like the
built-in ones.

A registered base is an ordinary public base model "tunery/<name>" whose version's base_name is
the source itself (a local path made absolute, or the id or URL as given). Every process that
reads the version — the API checking a training, the trainer child, the prediction engines —
hands that to models.resolve_base, so none needs to look the name up again. The CLI
(`tunery bases`) and the admin-only /v1/bases routes both call `register_base` and show
`base_record`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError
from tunery.settings import Settings
from tunery.store.models import Model, Version, iso
from tunery.store.store import BASE_OWNER, Conflict, Store

#: Owner and model names: what Replicate allows in a model's URL.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,99}$"


def register_base(store: Store, settings: Settings, *, name: str, source: str, description: str | None,
                  registered_by: str) -> dict[str, Any]:
    """Check that `source` loads (config and tokenizer; every weight file present), convert or
    download it into the model cache when it is a GGUF or a URL, compute its content hash (cached
    for every later start), then add "tunery/<name>". Returns its `base_record` plus the resolved
    kind, path and sha256. Raises TuneryError in one line (store.Conflict when the name is
    taken); nothing is written to the database unless every check passed."""
    from tunery.models.registry import REGISTRY
    from tunery.models.resolve import probe_base, resolve_base

    if not re.match(NAME_PATTERN, name):
        raise TuneryError(f"base name {name!r}: use lowercase letters, digits, '.', '_' and '-' (at most 100)")
    if name in REGISTRY or store.get_model(BASE_OWNER, BASE_OWNER, name) is not None:
        raise Conflict(f"base model {BASE_OWNER}/{name} already exists")
    base_name = source_name(source)
    try:
        resolved = resolve_base(base_name, settings)
        probe_base(resolved)
    except TuneryError as exc:
        raise TuneryError(f"cannot register base {name!r}: {exc}") from None
    version = store.add_base(name, base_name, description=description, registered_by=registered_by)
    model = store.registered_base(name)
    assert model is not None
    return base_record(model, version) | {"kind": resolved.kind, "path": resolved.path, "sha256": resolved.sha256}


def source_name(source: str) -> str:
    """What a version's base_name holds for `source`: an existing local path made absolute (the
    trainer and the engines run in other working directories), anything else as given."""
    path = Path(source).expanduser()
    if "://" not in source and path.exists():
        return str(path.resolve())
    return source


def base_record(model: Model, version: Version | None) -> dict[str, Any]:
    """A registered base as /v1/bases and `tunery bases list` show it."""
    return {
        "name": model.name,
        "model": f"{model.owner}/{model.name}",
        "version": version.id if version else None,
        "source": version.base_name if version else None,
        "description": model.description,
        "registered_by": model.registered_by,
        "created_at": iso(model.created_at),
    }
