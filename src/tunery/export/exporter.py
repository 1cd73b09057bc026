"""`export(run, format)`: one export of a finished run into the run's exports, checked, atomic,
and the same bytes every time.

Formats:
- merged: the adapter folded into its base, a Hugging Face model folder (export/merged.py), in
  bf16 (default), f16 or f32; downloaded as a zip of the folder;
- gguf: one GGUF file for llama.cpp (export/gguf.py), in q8_0 (default), f16 or f32, written
  from the merged model and read back with transformers' GGUF loader to check it
  (export/gguf_check.py);
- ollama: that GGUF plus a Modelfile (export/ollama.py), downloaded as a zip, with the
  `ollama create` line to use it;
- gguf-lora: the adapter alone as a LoRA GGUF for llama.cpp's `--lora`, over a GGUF of the base
  (a LoRA run's; a QLoRA adapter was trained against NF4 weights, so its merged export is the
  faithful one).

Each export is made in a temporary folder beside its final place and renamed into it, then copied
to the run's storage: an export that fails (an unsupported architecture, a check that does not
pass, a full disk) leaves nothing under its name. Archives list their files in a fixed order with
a fixed date, so exporting again gives the same bytes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.artifacts.run import ADAPTER, MANIFEST, TOKENIZER, Run
from tunery.export import ExportError
from tunery.export.gguf import LORA_QUANTS
from tunery.export.gguf import QUANTS as GGUF_QUANTS

FORMATS = ("merged", "gguf", "ollama", "gguf-lora")
MERGED_DTYPES = ("bf16", "f16", "f32")
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)
_LOCK = threading.Lock()  # one export at a time per process: each holds a whole model in memory


@dataclass
class Export:
    """A finished export: its name in the run's exports, the file to download, and its check."""

    name: str
    format: str
    file: Path  # the local copy of the downloadable file (.zip or .gguf)
    info: dict[str, Any]

    @property
    def download_name(self) -> str:
        return self.file.name


def export_name(fmt: str, *, dtype: str = "bf16", quant: str = "q8_0") -> str:
    """The export's name in the run (and its file's stem), from its format and precision; raises
    ExportError for an unknown format or precision."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "merged":
        if dtype not in MERGED_DTYPES:
            raise ExportError(f"merged dtype {dtype!r} is not one of {', '.join(MERGED_DTYPES)}")
        return f"merged-{dtype}"
    allowed = LORA_QUANTS if fmt == "gguf-lora" else GGUF_QUANTS
    if quant not in allowed:
        raise ExportError(f"{fmt} quantization {quant!r} is not one of {', '.join(allowed)}")
    return f"{fmt}-{quant}"


def file_name(name: str) -> str:
    return f"{name}.gguf" if name.startswith("gguf-") else f"{name}.zip"  # gguf-q8_0, gguf-lora-f16: one file


def export(run: Run, fmt: str, *, dtype: str = "bf16", quant: str = "q8_0", settings=None,
           force: bool = False) -> Export:
    """Export `run` (finished: it has a manifest and weights) as `fmt`. An export that exists is
    returned as it is unless `force`."""
    name = export_name(fmt, dtype=dtype, quant=quant)
    if not run.exists(MANIFEST):
        raise ExportError(f"run {run.url} has no {MANIFEST}: a training that failed or is still running has "
                          "nothing to export")
    target = run.export_entry(file_name(name))
    if not force and run.exists(target):
        return Export(name, fmt, run.pull(target), _read_info(run, name))
    with _LOCK:
        local = run.local_weights()
        manifest = json.loads((local / MANIFEST).read_text())
        output = local / (manifest.get("output") or ADAPTER)
        tokenizer = local / TOKENIZER if (local / TOKENIZER).is_dir() else None
        exports = run.exports
        exports.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=exports) as tmp:
            work = Path(tmp)
            try:
                info = _make(fmt, name, manifest, output, tokenizer, work, dtype=dtype, quant=quant,
                             settings=settings)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise ExportError(f"no space left on the device while exporting {name} into {exports}") from e
                raise
            info["name"] = name
            product = work / "product"
            (product.parent / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
            final = exports / file_name(name)
            os.replace(product, final)
            os.replace(product.parent / "info.json", exports / f"{name}.json")
    run.push(run.export_entry(f"{name}.json"))
    run.push(target)  # the file last: its presence in the storage means the export is whole
    return Export(name, fmt, final, info)


def _read_info(run: Run, name: str) -> dict[str, Any]:
    try:
        return json.loads(run.read_bytes(run.export_entry(f"{name}.json")))
    except (OSError, ValueError, FileNotFoundError):
        return {}


def list_exports(run: Run) -> list[dict[str, Any]]:
    """The run's finished exports: name, file, size and check."""
    found = [export_name("merged", dtype=d) for d in MERGED_DTYPES]
    found += [export_name(f, quant=q) for f in FORMATS if f != "merged"
              for q in (LORA_QUANTS if f == "gguf-lora" else GGUF_QUANTS)]
    out = []
    for name in found:
        if run.exists(run.export_entry(file_name(name))):
            fmt = "gguf-lora" if name.startswith("gguf-lora-") else name.split("-")[0]
            out.append({"name": name, "format": fmt, "file": file_name(name), **_read_info(run, name)})
    return out


def _make(fmt: str, name: str, manifest: dict, output: Path, tokenizer: Path | None, work: Path, *,
          dtype: str, quant: str, settings) -> dict[str, Any]:
    """Build the export's file as work/product; returns its check."""
    from tunery.export.merged import write_merged

    if fmt == "merged":
        folder = work / name
        info = write_merged(manifest, output, tokenizer, folder, dtype=dtype, settings=settings)
        _zip(folder, work / "product", root=name)
        return info
    from tunery.export.gguf import write_gguf, write_lora_gguf
    from tunery.export.gguf_check import check_gguf

    if fmt == "gguf-lora":
        if manifest.get("peft_method") == "full":
            raise ExportError("a full fine-tune has no adapter: export it as gguf")
        from tunery.export.merged import base_reference
        from tunery.models.resolve import resolve_base

        base_dir = Path(resolve_base(base_reference(manifest), settings).path)
        written = write_lora_gguf(output, work / "product", base_dir, quant=quant)
        return {"format": fmt, "quant": quant, "gguf": written, "check": _lora_tensors(work / "product", output)}

    merged = work / "merged"
    write_merged(manifest, output, tokenizer, merged, dtype="f32", settings=settings)
    gguf_path = work / f"{name}.gguf"
    written = write_gguf(merged, gguf_path, quant=quant)
    check = check_gguf(gguf_path, merged)
    info = {"format": fmt, "quant": quant, "gguf": written, "check": check}
    if fmt == "gguf":
        os.replace(gguf_path, work / "product")
        return info
    from transformers import AutoTokenizer

    from tunery.export.ollama import modelfile

    data_format = (manifest.get("data") or {}).get("train_data", {}).get("format")
    folder = work / name
    folder.mkdir()
    os.replace(gguf_path, folder / gguf_path.name)
    text = modelfile(gguf_path.name, AutoTokenizer.from_pretrained(merged), data_format)
    (folder / "Modelfile").write_text(text)
    info["modelfile"] = text
    info["ollama_create"] = f"cd {name} && ollama create MODEL_NAME -f Modelfile"
    shutil.rmtree(merged)
    _zip(folder, work / "product", root=name, compress=False)
    return info


def _lora_tensors(gguf_path: Path, adapter: Path) -> dict[str, Any]:
    """Read the LoRA GGUF back (gguf's own reader): one lora_a and one lora_b per adapted weight."""
    import gguf
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        expected = sum(1 for key in f.keys() if ".lora_A." in key or ".lora_B." in key)
    found = [t.name for t in gguf.GGUFReader(str(gguf_path)).tensors]
    lora = [n for n in found if n.endswith((".lora_a", ".lora_b"))]
    if len(lora) != expected:
        raise ExportError(f"the LoRA GGUF holds {len(lora)} LoRA tensors where the adapter has {expected}")
    return {"lora_tensors": len(lora)}


def _zip(folder: Path, dest: Path, *, root: str, compress: bool = True) -> None:
    """A zip of `folder` under `root`/ whose bytes depend only on the files' contents."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(dest, "w", compression=method) as zf:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(f"{root}/{f.relative_to(folder).as_posix()}", date_time=_FIXED_TIME)
            info.compress_type = method
            info.external_attr = 0o644 << 16
            with open(f, "rb") as src, zf.open(info, "w", force_zip64=True) as out:
                shutil.copyfileobj(src, out, 1024 * 1024)
