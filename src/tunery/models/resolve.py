"""Turn what a user typed as `--base` into a directory transformers can load quickly.

Accepted, tried in this order: a registry short name, a `.gguf` file, a local model
directory, a Hugging Face id. A GGUF file is dequantized once and cached as safetensors
under the data directory, so every later load reads plain tensors (well under a second
for SmolLM2-135M instead of ~30 s of dequantization).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from tunery.data.sources import sha256_file
from tunery.errors import ModelNotFoundError
from tunery.models.registry import REGISTRY, package_dir
from tunery.settings import Settings, get_settings

HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
CACHE_INFO = "tunery-base.json"


@dataclass(frozen=True)
class ResolvedBase:
    """A base model ready to load: `path` is a directory with config, weights and tokenizer
    (or, for kind "hf", a hub id)."""

    name: str
    kind: str  # "registry", "gguf", "dir" or "hf"
    path: str
    source: str
    sha256: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_base(base: str, settings: Settings | None = None) -> ResolvedBase:
    """Resolve `base`, converting and caching a GGUF the first time. Raises ModelNotFoundError
    listing every interpretation that was tried."""
    settings = settings or get_settings()
    tried: list[str] = []

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
            cached = _cached_gguf(gguf, settings.model_cache / entry.name)
            return ResolvedBase(entry.name, "registry", str(cached), str(gguf), _cache_hash(cached))
        base = entry.hf_id
    else:
        tried.append(f"not a registered name ({', '.join(sorted(REGISTRY))})")

    path = Path(base).expanduser()
    if base.endswith(".gguf"):
        if path.is_file():
            key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
            cached = _cached_gguf(path, settings.model_cache / f"gguf-{key.hexdigest()[:16]}")
            return ResolvedBase(base, "gguf", str(cached), str(path.resolve()), _cache_hash(cached))
        tried.append(f"no GGUF file at {path}")
    elif path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedBase(base, "dir", str(path.resolve()), str(path.resolve()), _dir_hash(path))
        tried.append(f"the directory {path} has no config.json")
    elif path.exists():
        tried.append(f"{path} is a file but not a .gguf model")
    else:
        tried.append(f"no local directory {path}")

    if HF_ID.match(base) and not path.exists():
        return ResolvedBase(base, "hf", base, f"hf:{base}", None)
    tried.append("not a Hugging Face id (owner/name)")
    raise ModelNotFoundError(f"unknown base model {base!r}: " + "; ".join(tried))


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
    with quiet_transformers():
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
    (tmp / CACHE_INFO).write_text(json.dumps(info, indent=2))
    try:
        tmp.rename(cache_dir)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir


def _cache_hash(cache_dir: Path) -> str | None:
    return json.loads((cache_dir / CACHE_INFO).read_text()).get("sha256")


def _dir_hash(path: Path) -> str:
    """Content hash of a model directory's weight files (sha256 over their sha256s)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()



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
