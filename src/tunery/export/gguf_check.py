"""Check a written GGUF file by reading it back: `check_gguf` runs it in code that shares nothing
with the writer (export/gguf.py) and compares its logits with the original model's on a few
prompts, within a tolerance per file type. Two readers:

- llama.cpp itself (the `llama_cpp` package, llama-cpp-python, when it is installed): the runtime
  Ollama and LM Studio embed, so a file it reads right is a file they read right, tokenizer included;
- transformers' GGUF loader otherwise. It maps only some of a file's keys into a config, so the
  keys llama.cpp reads and it does not are applied here from the file, with llama.cpp's meaning:
  the head size (`attention.key_length`), the rotated share of a head, linear rotary scaling, the
  `rope_freqs` divisors (Llama 3.1), Gemma's soft-capping, query scale, sliding-window layers and
  their rotary base.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from tunery.export import ExportError
from tunery.export.gguf import file_types

READERS = ("llama.cpp", "transformers")

# Tolerances of check_gguf, per file type, for both readers. Logits are compared in absolute terms
# against `rel * scale` (scale: the largest |logit| of the original model on the prompts, at least
# 1), so the same bound works for a random test model (logits ~0.1-10) and a trained one (~20), and
# the top token must agree on a share of the positions. Measured (max |diff| / scale, top-token
# agreement; eight tiny random families of tests/families.py, both readers; benchmarks/NOTES.md):
# f32 0 in transformers, 2e-6 in llama.cpp and 2e-4 for Gemma (llama.cpp's GELU goes through an
# f16 table); f16 <= 4e-3; bf16 <= 4e-2, agreement >= 0.96; q8_0 <= 0.085, >= 0.91 (0.85 on a
# Llama 2 after a few LoRA steps; 0.206 for llama-3's tiny chat run read by llama.cpp on an
# AVX2-only CPU, agreement 0.955); q5 <= 0.44,
# >= 0.62; q4 <= 0.75, >= 0.37 (random models' near-tied logits make 4- and 5-bit agreement low;
# SmolLM2's real weights keep far more). A broken layout is far outside: q/k not permuted gives
# 1.3-1.4 with 7-15% agreement, Gemma's norms without their +1 gives 1.0 with none, at every type.
TOLERANCES: dict[str, dict[str, float]] = {
    "f32": {"rel": 1e-3, "argmax": 0.99},
    "f16": {"rel": 1e-2, "argmax": 0.95},
    "bf16": {"rel": 1e-1, "argmax": 0.9},
    "q8_0": {"rel": 2.5e-1, "argmax": 0.75},
    "q5_1": {"rel": 6e-1, "argmax": 0.5},
    "q5_0": {"rel": 6e-1, "argmax": 0.5},
    "q4_1": {"rel": 1.0, "argmax": 0.3},
    "q4_0": {"rel": 1.0, "argmax": 0.3},
}

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Once upon a time, in a small village by the sea, there lived",
]


def default_reader() -> str:
    """llama.cpp when its Python binding is installed, else transformers."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "transformers"
    return "llama.cpp"


def check_gguf(gguf_path: Path, model_dir: Path, *, prompts: list[str] | None = None,
               reader: str | None = None) -> dict:
    """Independent read-back: run the GGUF with `reader` (one of READERS; default_reader() when
    None) and compare its logits on a few prompts with the HF model in model_dir (fp32). Returns
    {"reader", "max_abs_diff", "tolerance", "argmax_agreement", ...}; raises ExportError when beyond
    tolerance.

    The prompts are tokenized once, with model_dir's tokenizer, and fed to both models as ids, so
    this checks the weights and hyperparameters; whether the GGUF's own tokenizer gives the same
    ids is reported as "tokenizer_match" (transformers rebuilds a GGUF tokenizer only approximately
    for some pre-tokenizers, so it is informative, not a failure)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.models.resolve import quiet_transformers

    reader = reader or default_reader()
    if reader not in READERS:
        raise ExportError(f"unknown GGUF reader {reader!r}; one of {', '.join(READERS)}")
    gguf_path, model_dir = Path(gguf_path), Path(model_dir)
    if not gguf_path.is_file():
        raise ExportError(f"cannot check {gguf_path}: no such file")
    try:
        file = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as exc:
        raise ExportError(f"cannot check {gguf_path}: it is not a readable GGUF file ({_first_line(exc)})") from None
    field = file.fields.get("general.file_type")
    file_type = int(field.contents()) if field is not None else -1
    quant = {int(v): k for k, v in file_types().items()}.get(file_type)
    if quant is None:
        raise ExportError(f"cannot check {gguf_path}: its file type {file_type} has no tolerance here")
    tol = TOLERANCES[quant]

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model_dir)
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = list(prompts) if prompts else _default_prompts(tok)
    encoded = [tok(text)["input_ids"] for text in texts]
    runner: _LlamaCpp | _Transformers
    if reader == "llama.cpp":
        runner = _LlamaCpp(gguf_path, max(len(ids) for ids in encoded))
    else:
        runner = _Transformers(gguf_path, file)

    max_diff, scale, agree, total, tokens_match = 0.0, 1.0, 0, 0, True
    with torch.no_grad():
        for text, ids in zip(texts, encoded, strict=True):
            if runner.tokenize(text) != ids:
                tokens_match = False
            a = ref(input_ids=torch.tensor([ids])).logits[0].float()
            b = torch.as_tensor(runner.logits(ids)).float()
            if a.shape != b.shape:
                raise ExportError(f"{gguf_path.name}: logits of shape {tuple(b.shape)} where the model gives {tuple(a.shape)}")
            max_diff = max(max_diff, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
    runner.close()
    agreement = agree / max(total, 1)
    tolerance = tol["rel"] * scale
    result = {
        "reader": reader,
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
            f"{gguf_path.name} does not read back in {reader} as {model_dir}: max |logit difference| {max_diff:.3g} "
            f"(tolerance {tolerance:.3g} for {quant}), top token agreement {agreement:.3f} "
            f"(needs {tol['argmax']}) over {total} positions"
        )
    return result


class _LlamaCpp:
    """The file in llama.cpp (llama-cpp-python): every position's logits, in one batch."""

    def __init__(self, path: Path, n_tokens: int) -> None:
        from llama_cpp import Llama

        try:
            with _quiet_stderr():
                self.llm = Llama(model_path=str(path), n_ctx=max(64, n_tokens + 8), n_batch=max(64, n_tokens + 8),
                                 logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=max(1, os.cpu_count() or 1))
        except Exception as exc:  # llama.cpp's loader raises ValueError("Failed to load model ...")
            raise ExportError(f"{path.name} does not read back: llama.cpp fails to load it: {_first_line(exc)}") from None

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()


class _Transformers:
    """The file in transformers' GGUF loader, with the keys it does not map applied as llama.cpp
    reads them (see the module docstring)."""

    def __init__(self, path: Path, file: Any) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from tunery.models.resolve import one_gguf_parse, quiet_transformers

        folder, name = str(path.parent), path.name
        try:
            with quiet_transformers(), one_gguf_parse():
                config = AutoConfig.from_pretrained(folder, gguf_file=name)
                divisors = _apply_llama_cpp_keys(config, file)
                self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config,
                                                                  dtype=torch.float32).eval()
                self.tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception as exc:  # the loader raises ValueError, KeyError, NotImplementedError, ...
            raise ExportError(
                f"{path.name} does not read back: transformers' GGUF loader fails on it: {_first_line(exc)}"
            ) from None
        if divisors is not None:  # llama.cpp divides each rotated pair's frequency by its rope_freqs entry
            rotary = self.model.model.rotary_emb
            scaled = rotary.inv_freq / torch.as_tensor(divisors, dtype=rotary.inv_freq.dtype)
            rotary.inv_freq.copy_(scaled)
            if hasattr(rotary, "original_inv_freq"):
                rotary.original_inv_freq = scaled.clone()

    def tokenize(self, text: str) -> list[int]:
        return self.tok(text)["input_ids"]

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        return self.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()

    def close(self) -> None:
        pass


def _apply_llama_cpp_keys(config: Any, file: Any) -> np.ndarray | None:
    """Set on a config from transformers' GGUF loader what the file says and the loader does not
    read, as llama.cpp interprets it; returns the rope_freqs divisors (or None) to apply to the
    built model's rotary embedding."""
    fields = file.fields
    arch = str(fields["general.architecture"].contents())

    def key(name: str, default: Any = None) -> Any:
        field = fields.get(f"{arch}.{name}")
        return field.contents() if field is not None else default

    n_head = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", int(key("embedding_length")) // n_head))
    config.head_dim = head_dim
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.setdefault("rope_type", "default")
    rope["rope_theta"] = float(key("rope.freq_base", rope.get("rope_theta", 10000.0)))
    if key("rope.scaling.type") == "linear":
        rope.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    rot = key("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        rope["partial_rotary_factor"] = int(rot) / head_dim
        config.partial_rotary_factor = int(rot) / head_dim
    if arch in ("gemma2", "gemma3"):
        n_layers = int(key("block_count"))
        big = n_layers == (46 if arch == "gemma2" else 62)
        config.query_pre_attn_scalar = int(key("embedding_length")) // n_head if big else head_dim
        if arch == "gemma2":
            config.attn_logit_softcapping = key("attn_logit_softcapping")
        config.final_logit_softcapping = key("final_logit_softcapping")
        pattern = key("attention.sliding_window_pattern")
        if pattern is not None:
            config.layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
            config.sliding_window = int(key("attention.sliding_window"))
        if arch == "gemma3":
            local = dict(rope, rope_type="default", rope_theta=float(key("rope.freq_base_swa", 10000.0)))
            local.pop("factor", None)
            rope = {"full_attention": rope, "sliding_attention": local}
    config.rope_parameters = rope
    tensor = next((t for t in file.tensors if t.name == "rope_freqs.weight"), None)
    return None if tensor is None else np.asarray(tensor.data, dtype=np.float32).copy()


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp's loader writes its log to file descriptor 2 even when asked not to."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _default_prompts(tok: Any) -> list[str]:
    prompts = list(DEFAULT_PROMPTS)
    if getattr(tok, "chat_template", None):
        prompts.append(tok.apply_chat_template(
            [{"role": "user", "content": "Name three colours."}], tokenize=False, add_generation_prompt=True))
    return prompts
