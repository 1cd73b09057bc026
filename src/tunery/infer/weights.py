"""Find the trained weights a prediction should use, from whatever the user passed as `weights`.

Accepted forms:

- a run in storage, by its URL (s3://bucket/prefix/trainings/ID, or any fsspec URL): its
  manifest, weights and tokenizer are copied once into `<home>/cache/runs`, then read as a run
  directory;
- a run directory, as training leaves it: manifest.json plus adapter/ (lora, qlora) or model/
  (full fine-tune), and tokenizer/;
- the run's training_output.zip (the same layout at the archive root), extracted once into
  `<home>/weights/<sha256 of the archive>` so every later request reuses the extracted copy;
- a bare adapter directory (adapter_config.json), whose base then comes from the adapter
  config's `base_model_name_or_path`;
- a whole model directory (config.json), e.g. a run's model/ passed on its own;
- one checkpoint of a run, `<run>/checkpoints/checkpoint-<step>` (a folder, or a URL in storage):
  its adapter or model, with the run's manifest (the base, checked as for the run) and tokenizer.

Nothing here imports torch; resolving is cheap enough to do on every request.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from tunery.artifacts.run import ADAPTER, CHECKPOINTS, MANIFEST, MODEL, TOKENIZER, is_url, split_checkpoint
from tunery.data.sources import sha256_file
from tunery.errors import TuneryError
from tunery.settings import Settings, get_settings

RUN_MARKERS = (MANIFEST, ADAPTER, MODEL)


@dataclass(frozen=True)
class Weights:
    """Trained weights ready to load.

    `path` is the adapter directory (kind "adapter") or the whole-model directory (kind "full").
    `tokenizer` is the tokenizer directory saved with the run, or None to use the base's (or, for
    a full model, the model directory's). `base` is the base model name as training recorded it
    (manifest, else adapter_config), None when unknown; `base_sha256` is the manifest's hash of
    the base weights, used to refuse an adapter trained on a different base. `source` is what
    the user passed, for messages.
    """

    kind: Literal["adapter", "full"]
    path: Path
    tokenizer: Path | None
    base: str | None
    base_sha256: str | None = None
    source: str = ""


def resolve_weights(weights: str | Path, settings: Settings | None = None) -> Weights:
    """Resolve `weights` (see the module docstring for the accepted forms).

    Raises TuneryError naming the path when it does not exist, is a file that is not a zip
    archive, or holds no adapter or model in a recognised layout.
    """
    raw = str(weights)
    if not raw.strip():
        raise TuneryError("weights: empty path (leave weights unset to use the base model alone)")
    checkpoint = split_checkpoint(raw)
    if checkpoint is not None and is_url(raw):
        run = (settings or get_settings()).run(checkpoint[0])
        name = f"{CHECKPOINTS}/{checkpoint[1]}"
        try:
            folder = run.pull(name)
            run.pull(MANIFEST)
            if run.exists(TOKENIZER):
                run.pull(TOKENIZER)
        except (OSError, ValueError, TuneryError) as e:
            raise TuneryError(f"weights {raw!r}: cannot read the checkpoint from storage ({e}); the training "
                              "keeps only its newest checkpoints") from e
        return _from_checkpoint(folder, raw)
    if is_url(raw):
        run = (settings or get_settings()).run(raw)
        try:
            local = run.local_weights()
        except (OSError, ValueError) as e:
            raise TuneryError(f"weights {raw!r}: cannot read the run from storage: {type(e).__name__}: {e}") from e
        return _from_run_dir(local, raw, where=f"run {raw!r}")
    path = Path(raw).expanduser()
    if not path.exists():
        raise TuneryError(f"weights {raw!r}: no such file or directory ({path.absolute()})")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise TuneryError(
                f"weights {raw!r}: {path} is a file but not a zip archive; expected a run directory, "
                "its training_output.zip, or an adapter directory"
            )
        root = _run_root(_extract_archive(path, settings or get_settings()))
        return _from_run_dir(root, raw, where=f"weights archive {raw!r}", at=" at its root")
    path = path.resolve()
    if split_checkpoint(path) is not None and (path.parent.parent / MANIFEST).is_file():
        return _from_checkpoint(path, raw)
    # A run's adapter/ or model/ passed directly: use the run, whose manifest names the base
    # as the user gave it and whose tokenizer/ is the one training used.
    if path.name in (ADAPTER, MODEL) and (path.parent / MANIFEST).is_file():
        return _from_run_dir(path.parent, raw, where=f"run directory {str(path.parent)!r}")
    if (path / "adapter_config.json").is_file():
        config = _read_json(path / "adapter_config.json", raw)
        return Weights("adapter", path, _tokenizer_in(path), config.get("base_model_name_or_path"), None, raw)
    if any((path / m).exists() for m in RUN_MARKERS):
        return _from_run_dir(path, raw, where=f"run directory {raw!r}")
    if (path / "config.json").is_file():
        return Weights("full", path, _tokenizer_in(path), None, None, raw)
    raise TuneryError(
        f"weights {raw!r}: {path} is not a run directory (manifest.json with adapter/ or model/), "
        "an adapter directory (adapter_config.json) or a model directory (config.json)"
    )


def _from_run_dir(run: Path, raw: str, *, where: str, at: str = "") -> Weights:
    """Weights of a run directory laid out as training writes it."""
    manifest = _read_json(run / MANIFEST, raw) if (run / MANIFEST).is_file() else {}
    method = manifest.get("peft_method")
    base_entry = manifest.get("base")
    base_info = base_entry if isinstance(base_entry, dict) else {}
    adapter, model = run / ADAPTER, run / MODEL
    tokenizer = run / TOKENIZER if (run / TOKENIZER).is_dir() else None

    full = method == "full" or (method is None and not adapter.is_dir() and model.is_dir())
    if full:
        if not (model / "config.json").is_file():
            raise TuneryError(f"{where} is a full fine-tune but has no model/config.json{at}{_listing(run)}")
        return Weights(
            "full",
            model,
            tokenizer or _tokenizer_in(model),
            base_info.get("name"),
            base_info.get("sha256"),
            raw,
        )
    if not (adapter / "adapter_config.json").is_file():
        what = f"peft_method {method!r} needs" if method else "expected"
        raise TuneryError(f"{where} has no adapter: {what} adapter/adapter_config.json{at}{_listing(run)}")
    base = base_info.get("name") or _read_json(adapter / "adapter_config.json", raw).get(
        "base_model_name_or_path"
    )
    return Weights("adapter", adapter, tokenizer, base, base_info.get("sha256"), raw)


def _from_checkpoint(folder: Path, raw: str) -> Weights:
    """Weights of one checkpoint of a run (`<run>/checkpoints/checkpoint-<step>`): the adapter or
    model the Trainer saved there, the run's tokenizer and the base its manifest names."""
    run = folder.parent.parent
    manifest = _read_json(run / MANIFEST, raw)
    base_entry = manifest.get("base")
    base_info = base_entry if isinstance(base_entry, dict) else {}
    tokenizer = run / TOKENIZER if (run / TOKENIZER).is_dir() else _tokenizer_in(folder)
    if (folder / "adapter_config.json").is_file():
        base = base_info.get("name") or _read_json(folder / "adapter_config.json", raw).get("base_model_name_or_path")
        return Weights("adapter", folder, tokenizer, base, base_info.get("sha256"), raw)
    if (folder / "config.json").is_file():
        return Weights("full", folder, tokenizer, base_info.get("name"), base_info.get("sha256"), raw)
    raise TuneryError(f"weights {raw!r}: checkpoint {folder.name} holds no adapter or model{_listing(folder)}")


def _run_root(folder: Path) -> Path:
    """The run inside an extracted archive: its root, or the single folder it holds when the
    archive was made with a top-level directory (zip -r run.zip run/)."""
    if any((folder / m).exists() for m in RUN_MARKERS):
        return folder
    children = [c for c in folder.iterdir() if not c.name.startswith(".")]
    if len(children) == 1 and children[0].is_dir() and any((children[0] / m).exists() for m in RUN_MARKERS):
        return children[0]
    return folder


# (resolved path, size, mtime_ns) -> sha256, so an archive is hashed once per process, not on
# every request (a full fine-tune archive can be gigabytes).
_ARCHIVE_HASHES: dict[tuple[str, int, int], str] = {}
_ARCHIVE_LOCK = threading.Lock()


def _extract_archive(archive: Path, settings: Settings) -> Path:
    """Extract `archive` once into `<home>/weights/<sha256>` and return that folder.

    Extraction goes to a temporary sibling that is renamed into place, so a folder under its
    final name is always complete, even if two processes extract the same archive at once.
    """
    stat = archive.stat()
    key = (str(archive.resolve()), stat.st_size, stat.st_mtime_ns)
    with _ARCHIVE_LOCK:
        digest = _ARCHIVE_HASHES.get(key)
        if digest is None:
            digest = _ARCHIVE_HASHES[key] = sha256_file(archive)
    dest = settings.home / "weights" / digest
    if dest.is_dir():
        return dest
    tmp = dest.with_name(f".{digest}.tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                # zipfile already drops ".." and leading "/" on extraction; refusing such names
                # outright makes a tampered archive an error rather than a silently altered tree.
                parts = PurePosixPath(name.replace("\\", "/")).parts
                if name.startswith(("/", "\\")) or ".." in parts:
                    raise TuneryError(f"weights archive {str(archive)!r}: unsafe member path {name!r}")
            zf.extractall(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first; its copy is identical
            pass
    except zipfile.BadZipFile as e:
        raise TuneryError(f"weights archive {str(archive)!r} is corrupt: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _tokenizer_in(folder: Path) -> Path | None:
    """`folder` when it holds a saved tokenizer, else None."""
    return folder if (folder / "tokenizer_config.json").is_file() else None


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return f" (it holds: {', '.join(names) or 'nothing'})"


def _read_json(path: Path, raw: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TuneryError(f"weights {raw!r}: cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TuneryError(f"weights {raw!r}: {path} is not a JSON object")
    return data


def weights_stamp(folder: Path) -> tuple:
    """Name, size and mtime of the weight files in `folder`: cheap to read, and it changes when
    the weights are rewritten in place (an engine then loads them again)."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
