"""manifest.json (what was trained, from what, how, with which results) and the archive of the weights."""

from __future__ import annotations

import json
import os
import platform
import time
import zipfile
from pathlib import Path
from typing import Any

ARCHIVE_NAME = "training_output.zip"
MANIFEST = "manifest.json"


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import tunery

    return {
        "tunery": tunery.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def build_manifest(*, inputs, base: str, resolved, files: dict, data_stats: dict, metrics: dict,
                   samples: list, output: str, device: str) -> dict[str, Any]:
    """Everything needed to know what a run is and to reproduce it."""
    return {
        "format": "tunery.run/1",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {"name": base, **resolved.as_dict()},
        "peft_method": inputs.peft_method,
        "inputs": inputs.model_dump(exclude_unset=True),
        "resolved_inputs": inputs.model_dump(),
        "data": files,
        "data_stats": data_stats,
        "metrics": metrics,
        "samples": samples,
        "output": output,
        "tokenizer": "tokenizer",
        "archive": ARCHIVE_NAME,
        "device": device,
        "versions": versions(),
    }


def write_manifest(run_dir: Path, manifest: dict) -> Path:
    """Write atomically (temp file + rename) so a reader never sees half a manifest."""
    path = Path(run_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, path)
    return path


def read_manifest(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / MANIFEST).read_text())


def write_archive(run_dir: Path, output: str) -> Path:
    """Zip the weights folder (`adapter` or `model`), the tokenizer and the manifest into one file,
    paths relative to the run directory, so the archive unpacks into a loadable run."""
    run_dir = Path(run_dir)
    path = run_dir / ARCHIVE_NAME
    tmp = path.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for folder in (output, "tokenizer"):
            for f in sorted((run_dir / folder).rglob("*")):
                if f.is_file():
                    zf.write(f, f.relative_to(run_dir).as_posix())
        zf.write(run_dir / MANIFEST, MANIFEST)
    os.replace(tmp, path)
    return path
