"""Check a written GGUF file by reading it back: `check_gguf` loads it with transformers' GGUF
loader — code that shares nothing with the writer (export/gguf.py) — and compares its logits with
the original model's on a few prompts, within a tolerance per file type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tunery.export import ExportError
from tunery.export.gguf import file_types

# Tolerances of check_gguf, per file type. Logits are compared in absolute terms against
# `rel * scale` (scale: the largest |logit| of the original model on the prompts, at least 1), so the
# same bound works for a random test model (logits ~0.1) and a trained one (logits ~20).
# f32 differs only by summation order; f16/bf16 round every weight (relative 2^-11 / 2^-8); Q8_0
# rounds to 8 bits per block of 32, which moves logits by a few percent of their range, so it is
# also held to the original's top token on most positions. Measured (max |diff| / scale): f32 0
# (bit-exact), f16 ~1e-3, bf16 ~1e-2, q8_0 ~2-3e-2 with 96-97% top-token agreement, on the tiny
# test Llama and on SmolLM2-135M; the bounds leave a 10x (f16) / 3x (q8_0) margin.
TOLERANCES: dict[str, dict[str, float]] = {
    "f32": {"rel": 1e-4, "argmax": 0.99},
    "f16": {"rel": 1e-2, "argmax": 0.95},
    "bf16": {"rel": 5e-2, "argmax": 0.9},
    "q8_0": {"rel": 1e-1, "argmax": 0.9},
    # 5 and 4 bits per weight (block scales, _1 also a minimum) move a random test model's logits by
    # ~16% (q5) and ~21-30% (q4) of their range, with 76-91% / 75-87% top-token agreement (the tiny
    # test Llama, two seeds; its near-tied logits make agreement fragile): bounds with a 2.5x / 2x margin.
    "q5_1": {"rel": 4e-1, "argmax": 0.7},
    "q5_0": {"rel": 4e-1, "argmax": 0.7},
    "q4_1": {"rel": 6e-1, "argmax": 0.6},
    "q4_0": {"rel": 6e-1, "argmax": 0.6},
}

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Once upon a time, in a small village by the sea, there lived",
]


def check_gguf(gguf_path: Path, model_dir: Path, *, prompts: list[str] | None = None) -> dict:
    """Independent read-back: load the GGUF with transformers' GGUF loader
    (AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)) and compare its logits on a few
    prompts with the HF model in model_dir (fp32). Returns {"max_abs_diff", "tolerance",
    "argmax_agreement", ...}; raises ExportError when beyond tolerance.

    The prompts are tokenized once, with model_dir's tokenizer, and fed to both models as ids, so
    this checks the weights and hyperparameters; whether the GGUF's tokenizer gives the same ids
    is reported as "tokenizer_match" (transformers rebuilds a GGUF tokenizer only approximately for
    some pre-tokenizers, so it is informative, not a failure)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.models.resolve import quiet_transformers

    gguf_path, model_dir = Path(gguf_path), Path(model_dir)
    if not gguf_path.is_file():
        raise ExportError(f"cannot check {gguf_path}: no such file")
    try:
        field = gguf.GGUFReader(gguf_path).fields.get("general.file_type")
    except (ValueError, OSError) as exc:
        raise ExportError(f"cannot check {gguf_path}: it is not a readable GGUF file ({_first_line(exc)})") from None
    file_type = int(field.contents()) if field is not None else -1
    quant = {int(v): k for k, v in file_types().items()}.get(file_type)
    if quant is None:
        raise ExportError(f"cannot check {gguf_path}: its file type {file_type} has no tolerance here")
    tol = TOLERANCES[quant]

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model_dir)
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        try:
            got = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
            gguf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except Exception as exc:  # the loader raises ValueError, KeyError, NotImplementedError, ...
            raise ExportError(
                f"{gguf_path.name} does not read back: transformers' GGUF loader fails on it: {_first_line(exc)}"
            ) from None

    texts = list(prompts) if prompts else _default_prompts(tok)
    max_diff, scale, agree, total, tokens_match = 0.0, 1.0, 0, 0, True
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            if gguf_tok(text)["input_ids"] != ids[0].tolist():
                tokens_match = False
            a = ref(input_ids=ids).logits[0].float()
            b = got(input_ids=ids).logits[0].float()
            if a.shape != b.shape:
                raise ExportError(f"{gguf_path.name}: logits of shape {tuple(b.shape)} where the model gives {tuple(a.shape)}")
            max_diff = max(max_diff, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
    agreement = agree / max(total, 1)
    tolerance = tol["rel"] * scale
    result = {
        "quant": quant,
        "max_abs_diff": max_diff,
        "tolerance": tolerance,
        "logit_scale": scale,
        "argmax_agreement": agreement,
        "min_argmax_agreement": tol["argmax"],
        "positions": total,
        "tokenizer_match": tokens_match,
    }
    if not np.isfinite(max_diff) or max_diff > tolerance or agreement < tol["argmax"]:
        raise ExportError(
            f"{gguf_path.name} does not read back as {model_dir}: max |logit difference| {max_diff:.3g} "
            f"(tolerance {tolerance:.3g} for {quant}), top token agreement {agreement:.3f} "
            f"(needs {tol['argmax']}) over {total} positions"
        )
    return result


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _default_prompts(tok: Any) -> list[str]:
    prompts = list(DEFAULT_PROMPTS)
    if getattr(tok, "chat_template", None):
        prompts.append(tok.apply_chat_template(
            [{"role": "user", "content": "Name three colours."}], tokenize=False, add_generation_prompt=True))
    return prompts
