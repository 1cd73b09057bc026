"""Merged weights: the adapter folded into its base, saved as an ordinary Hugging Face model folder.

The result loads with `AutoModelForCausalLM.from_pretrained` and in vLLM or TGI without peft:
safetensors in bf16, f16 or f32, config.json, the run's tokenizer with its chat template, and a
generation config whose eos ids stop where the trained model stops (the tokenizer's eos, which
training appends to every completion, and the base's own, e.g. an end-of-turn token).

A QLoRA adapter was trained against the NF4-quantized base, not the 16-bit one: it is merged
onto the dequantized 4-bit weights (the base loaded as training loaded it, then dequantized), so
the merged model computes what the trained model computed. A full fine-tune's model is re-saved
in the asked dtype.

Every export checks itself: on a few prompts, the saved merged model's logits are compared with
the run's base + adapter (fp32, unmerged); beyond the dtype's tolerance the export fails.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tunery.export import ExportError

log = logging.getLogger(__name__)

DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
# The largest logit difference allowed, relative to the largest logit magnitude, per saved dtype
# (rounding every weight to the dtype moves logits by about its epsilon times their scale).
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 4e-2}
CHECK_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Translate to German: good morning"]


def write_merged(manifest: dict, weights: Path, tokenizer_dir: Path | None, out: Path, *,
                 dtype: str = "bf16", settings=None) -> dict[str, Any]:
    """Merge the run described by `manifest` (its weights folder `weights`: adapter/ or model/)
    into `out` (created; must not exist). Returns what the check measured."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    method = manifest.get("peft_method")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or weights)
    base_dir: str | None = None
    with torch.no_grad():
        if method == "full":
            model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).eval()
            expected = reference_logits(model, tokenizer)
        else:
            from peft import PeftModel

            # The trained model as training left it (base + adapter, unmerged, fp32): its logits
            # are what the merged model must reproduce. Then the adapter is folded in, in place.
            peft_model = PeftModel.from_pretrained(_base(manifest, settings), str(weights)).eval()
            base_dir = str(peft_model.get_base_model().name_or_path)  # where the base was loaded from
            expected = reference_logits(peft_model, tokenizer)
            model = peft_model.merge_and_unload(safe_merge=True)
        model = model.to(getattr(torch, DTYPES[dtype]))
        _set_generation_eos(model, tokenizer)
        model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    del model
    tokenizer.save_pretrained(out)
    from tunery.models.load import keep_sentencepiece_model

    # A SentencePiece model, which a GGUF export reads: the run's, else the base's.
    for source in (tokenizer_dir, weights, base_dir):
        if source is not None:
            keep_sentencepiece_model(source, out)
    _drop_peft_traces(out)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    check = compare_logits(expected, saved, TOLERANCE[dtype], what=f"the merged model ({dtype})")
    return {"format": "merged", "dtype": dtype, "peft_method": method, **check}


def base_reference(manifest: dict) -> str:
    """How to find the run's base again: a directory base by its absolute path (the name it was
    given may be relative to where training ran), any other by its name."""
    base = manifest.get("base") or {}
    return (base.get("path") if base.get("kind") == "dir" else base.get("name")) or ""


def _base(manifest: dict, settings):
    """The run's base in fp32 on the CPU; for QLoRA, the NF4 weights training saw, dequantized."""
    import torch

    from tunery.models.load import load_model
    from tunery.models.resolve import resolve_base

    base = manifest.get("base") or {}
    resolved = resolve_base(base_reference(manifest), settings)
    if base.get("sha256") and resolved.sha256 and base["sha256"] != resolved.sha256:
        raise ExportError(f"the base {resolved.name!r} found here (sha256 {resolved.sha256[:12]}) is not the one "
                          f"the run was trained on (sha256 {base['sha256'][:12]})")
    if manifest.get("peft_method") == "qlora":
        model = load_model(resolved, precision="fp32", quantize_4bit=True, device="cpu")
        return model.dequantize().to(torch.float32).eval()
    return load_model(resolved, precision="fp32", device="cpu").eval()


def _set_generation_eos(model, tokenizer) -> None:
    """eos ids: the base's configured ones plus the tokenizer's (the one training appended)."""
    config = model.generation_config
    configured = config.eos_token_id
    ids = list(configured) if isinstance(configured, list) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id


def _drop_peft_traces(folder: Path) -> None:
    """A merged model is a plain model: no adapter files or model card beside it."""
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (folder / name).unlink(missing_ok=True)


def reference_logits(model, tokenizer, prompts: list[str] | None = None) -> list:
    """(prompt ids, fp32 logits) of `model` on the check prompts."""
    import torch

    out = []
    with torch.no_grad():
        for prompt in prompts or CHECK_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out.append((ids, model(input_ids=ids).logits.float()))
    return out


def compare_logits(expected: list, candidate, tolerance: float, *, what: str) -> dict[str, Any]:
    """Max |logit difference| of `candidate` against `expected` (from reference_logits), relative
    to the largest |logit|, against `tolerance`: ExportError beyond it. Also how often the top
    token agrees."""
    import torch

    worst, scale, agree, total = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for ids, a in expected:
            b = candidate(input_ids=ids).logits.float()
            worst = max(worst, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[1]
    relative = worst / max(scale, 1e-6)
    result = {"max_abs_diff": round(worst, 6), "relative_diff": round(relative, 6), "tolerance": tolerance,
              "argmax_agreement": round(agree / max(total, 1), 4)}
    log.info("%s: logits differ by at most %.3g (%.3g of their scale; tolerance %.3g), top token agrees %.1f%%",
             what, worst, relative, tolerance, 100 * agree / max(total, 1))
    if relative > tolerance:
        raise ExportError(f"{what} does not reproduce the trained model: its logits differ by {worst:.4g} "
                          f"({relative:.3g} of their scale; tolerance {tolerance})")
    return result
