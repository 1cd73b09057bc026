"""Write a Hugging Face model folder (or a LoRA adapter of one) as one GGUF file: Llama (2 and 3.x),
Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3/4.

GGUF is what llama.cpp, Ollama and LM Studio load: weights, hyperparameters, the tokenizer and
the chat template in one file. The layout follows llama.cpp's own converter, because that is what
every GGUF runtime expects:

- tensor names from gguf-py's name map (`blk.N.attn_q.weight`, `token_embd.weight`, ...), per
  architecture (LAYOUTS): Qwen3's and Gemma 3's q/k norms, Gemma's four norms per block, Phi-3's
  fused qkv and gate_up projections (written fused, as llama.cpp's Phi-3 reads them);
- for the Llama architecture (Llama, Mistral), the rows of q_proj and k_proj permuted per head:
  transformers' rotary embedding rotates the two halves of a head (`rotate_half`), llama.cpp's
  Llama rotates adjacent pairs, and the permutation turns one layout into the other
  (transformers' GGUF loader applies the inverse); the others use NeoX's rotary, which is
  transformers' own, and are written as they are (with Qwen2's q/k/v biases);
- Gemma's RMSNorm scales by (1 + weight): every norm weight is written with the 1 added, as
  llama.cpp's converter does;
- rotary scaling as llama.cpp reads it: Llama 3.1's `llama3` scaling as the `rope_freqs` tensor
  (one divisor per rotated pair), linear scaling as two keys; Gemma's local (sliding-window)
  layers as the per-layer `sliding_window_pattern` with their own rotary base;
- 1-D tensors (the norms) always in F32, 2-D ones in the asked type; Q8_0, Q5_0/1 and Q4_0/1
  quantize rows in blocks of 32 (gguf-py's quantizers), a tensor whose rows are not a multiple of
  32 falls back to F16 as llama.cpp does, and under 4/5 bits the embedding and output matrices
  stay Q8_0;
- `output.weight` only when the model does not tie its output layer to the embedding (a file
  without it is read as tied);
- the byte-level BPE vocabulary as `tokenizer.ggml.model = "gpt2"`, with merges, token types
  (added special tokens are CONTROL, so a runtime never splits `<|im_end|>`), the special ids, the
  add-BOS/EOS flags the tokenizer actually applies, and the chat template; a SentencePiece
  tokenizer (byte fallback: Llama 2, Mistral) as `tokenizer.ggml.model = "llama"`, each piece of
  its tokenizer.model with its score and type (the vocabulary is export/gguf_vocab.py's).

The file is written tensor by tensor (the tensor table first, from the safetensors headers alone),
so a 7B model needs one tensor in memory at a time, not the whole model. It goes to a temporary
sibling that is renamed at the end: a reader never sees a half-written GGUF, and a failure leaves
nothing behind. Everything is written in a fixed order with no timestamps, so the same folder and
quant give the same bytes (a digest of the file identifies the export).

export/gguf_check.py is the independent check of a written file (transformers' GGUF loader reads
it back); nothing here reads a GGUF.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunery.export import ExportError
from tunery.export.gguf_vocab import add_vocab, load_json, read_vocab

QUANTS = ("q8_0", "f16", "bf16", "f32", "q5_1", "q5_0", "q4_1", "q4_0")  # the exporter's default first
#: The block-quantized types (gguf-py's own quantizers, which write what llama.cpp's do): rows in
#: blocks of 32 weights, one scale (and for _1 a minimum) each.
BLOCK_QUANTS = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
#: Under 4- and 5-bit quants, the embedding and output matrices stay Q8_0, as llama.cpp's quantizer
#: keeps them at 6-8 bits: every token's logits go through them, and they are a small share of a model.
KEEP_Q8_0 = ("token_embd.weight", "output.weight")
#: An adapter is small and its matrices are low-rank products: no 4/5-bit form.
LORA_QUANTS = ("q8_0", "f16", "bf16", "f32")
Q8_0_BLOCK = 32


@dataclass(frozen=True)
class _Layout:
    """How one transformers model type is written: llama.cpp's architecture for it, whether q/k
    are permuted to llama.cpp's interleaved rotary (only its Llama), the activation that
    architecture computes, what is added to every norm weight, and the config flags it can carry."""

    arch: str  # gguf.MODEL_ARCH member
    permute: bool
    activation: str
    norm_shift: float = 0.0
    allowed_flags: tuple[str, ...] = ()


#: llama.cpp runs Mistral as Llama; Gemma 3's text model (Gemma3ForCausalLM) is `gemma3_text`.
LAYOUTS: dict[str, _Layout] = {
    "llama": _Layout("LLAMA", True, "silu"),
    "mistral": _Layout("LLAMA", True, "silu"),
    "qwen2": _Layout("QWEN2", False, "silu", allowed_flags=("attention_bias",)),
    "qwen3": _Layout("QWEN3", False, "silu"),
    "phi3": _Layout("PHI3", False, "silu"),
    "gemma2": _Layout("GEMMA2", False, "gelu_pytorch_tanh", norm_shift=1.0),
    "gemma3_text": _Layout("GEMMA3", False, "gelu_pytorch_tanh", norm_shift=1.0),
}
SUPPORTED_MODEL_TYPES = tuple(LAYOUTS)
#: Rotary scalings written as llama.cpp reads them (others are refused: yarn, longrope, dynamic).
ROPE_TYPES = ("default", "llama3", "linear")

@dataclass(frozen=True)
class _Tensor:
    """One tensor to write: where it is in the folder, its GGUF name and type."""

    hf_name: str
    file: Path
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int | None  # q/k: the head count of the rotary permutation
    shift: float = 0.0  # added to every weight (Gemma's norms)
    generated: np.ndarray | None = None  # a tensor computed here (rope_freqs), not read from the folder


def write_gguf(model_dir: Path, out_path: Path, *, quant: str = "f16") -> dict:
    """Write a Llama-family Hugging Face model folder (safetensors, config.json, tokenizer files,
    chat template) as a GGUF file. quant: one of QUANTS. Writes to a temporary
    sibling and renames, so no half-written file is ever left (also on an exception).
    Deterministic: the same input gives the same bytes (no timestamps; sorted iteration).
    Returns a small dict of what was written (architecture, tensors, quant, vocab size, bytes).

    Everything that can be refused (architecture, tokenizer, missing files, tensors with no GGUF
    name) is refused in one line before the output is opened."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    if quant not in QUANTS:
        raise ExportError(f"unknown GGUF quant {quant!r}; supported: {', '.join(QUANTS)}")
    config = _read_config(model_dir)
    vocab = read_vocab(model_dir, config)
    tensors = _plan_tensors(model_dir, config, quant)
    if not out_path.parent.is_dir():
        raise ExportError(f"cannot write {out_path}: the folder {out_path.parent} does not exist")

    arch = gguf.MODEL_ARCH_NAMES[_arch(config)]
    writer = gguf.GGUFWriter(None, arch)
    _add_metadata(writer, model_dir, config, quant)
    add_vocab(writer, vocab)
    for t in tensors:
        writer.add_tensor_info(t.gguf_name, _stored_shape(t), _stored_numpy_dtype(t),
                               _stored_nbytes(t), raw_dtype=t.qtype)

    _write_atomically(writer, out_path, lambda stack: _tensor_data(tensors, stack))
    return {
        "path": str(out_path),
        "architecture": arch,
        "model_type": config["model_type"],
        "quant": quant,
        "file_type": int(file_types()[quant]),
        "tensors": len(tensors),
        "vocab_size": len(vocab["tokens"]),
        "bytes": out_path.stat().st_size,
    }


def _write_atomically(writer: Any, out_path: Path, data: Callable[[ExitStack], Iterator[np.ndarray]]) -> None:
    """Write the header, metadata and tensor table the writer holds, then each tensor `data`
    yields (in the table's order), into a temporary sibling of `out_path` renamed over it at the
    end; on any failure the temporary file is removed and `out_path` is left as it was."""
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ExitStack() as stack:
            for array in data(stack):
                writer.write_tensor_data(array)
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def write_lora_gguf(adapter_dir: Path, out_path: Path, base_model_dir: Path, *, quant: str = "f16") -> dict:
    """Write a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) as a
    LoRA-only GGUF for llama.cpp's `--lora`, next to a GGUF of its base (base_model_dir: the Hugging
    Face folder of that base, for its architecture and head counts). quant: as write_gguf; LoRA
    matrices whose rows are not a multiple of 32 (lora_b, rank < 32) stay F16 under q8_0.

    The layout is llama.cpp's convert_lora_to_gguf.py: general.type "adapter", adapter.type "lora",
    adapter.lora.alpha, and per adapted weight `blk.N.attn_q.weight.lora_a` / `.lora_b`. llama.cpp
    scales B·A by alpha / rank (the rank read from the tensors), so per-module ranks need nothing
    more; an rsLoRA adapter (scale alpha / sqrt(rank)) is written with alpha · sqrt(rank) to give
    the same scale. Only lora_b carries q/k's output rows, so only it gets the rotary permutation.
    Refused in one line: DoRA, per-module alphas, a rank that differs between modules under
    rsLoRA, and adapters that carry whole tensors (modules_to_save, new embeddings)."""
    import gguf
    import torch
    from safetensors import safe_open

    adapter_dir, out_path, base_model_dir = Path(adapter_dir), Path(out_path), Path(base_model_dir)
    if quant not in LORA_QUANTS:
        raise ExportError(f"a LoRA adapter GGUF is written in {', '.join(LORA_QUANTS)} (as llama.cpp's "
                          f"convert_lora_to_gguf.py writes them), not {quant!r}")
    config = _read_config(base_model_dir)
    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for required in (cfg_path, weights):
        if not required.is_file():
            raise ExportError(f"cannot export the adapter {adapter_dir}: it has no {required.name}")
    lora = json.loads(cfg_path.read_text(encoding="utf-8"))
    if lora.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"cannot export the adapter {adapter_dir}: it is {lora.get('peft_type')!r}, not LoRA")
    if lora.get("use_dora"):
        raise ExportError(f"cannot export the adapter {adapter_dir}: DoRA adapters have no llama.cpp LoRA form")
    if lora.get("alpha_pattern"):
        raise ExportError(f"cannot export the adapter {adapter_dir}: per-module lora_alpha (alpha_pattern) "
                          "cannot be written (llama.cpp takes one alpha)")
    if not out_path.parent.is_dir():
        raise ExportError(f"cannot write {out_path}: the folder {out_path.parent} does not exist")

    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    name_map = gguf.get_tensor_name_map(_arch(config), n_layers)
    permutes = LAYOUTS[config["model_type"]].permute
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in sorted(f.keys()):
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if m is None:
                raise ExportError(
                    f"cannot export the adapter {adapter_dir}: {key} is not a LoRA matrix (whole tensors such as "
                    "modules_to_save or resized embeddings cannot go into a llama.cpp LoRA)")
            module, which = m.groups()
            gguf_base = name_map.get_name(module)
            if gguf_base is None or gguf_base in ("token_embd", "output"):
                raise ExportError(f"cannot export the adapter {adapter_dir}: LoRA on {module} is not supported "
                                  "(only the attention and MLP projections)")
            pairs.setdefault(f"{gguf_base}.weight", {})[which] = f.get_tensor(key).to(torch.float32).numpy()
    if not pairs:
        raise ExportError(f"cannot export the adapter {adapter_dir}: it holds no LoRA matrices")
    ranks = {v["A"].shape[0] for v in pairs.values() if "A" in v}
    alpha = float(lora.get("lora_alpha", lora.get("r", 8)))
    if lora.get("use_rslora"):
        if len(ranks) != 1:
            raise ExportError(f"cannot export the adapter {adapter_dir}: rsLoRA with ranks {sorted(ranks)} differing "
                              "between modules cannot be written with one alpha")
        alpha *= float(np.sqrt(next(iter(ranks))))

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[_arch(config)])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_file_type(file_types()[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    arrays: list[np.ndarray] = []
    for name in sorted(pairs, key=lambda n: (int(n.split(".")[1]), n)):
        pair = pairs[name]
        if set(pair) != {"A", "B"}:
            raise ExportError(f"cannot export the adapter {adapter_dir}: {name} has lora_A or lora_B missing")
        heads = None if not permutes else n_head if ".attn_q." in name else n_kv if ".attn_k." in name else None
        b = permute_rotary(pair["B"], heads) if heads else pair["B"]
        for suffix, matrix in (("lora_a", pair["A"]), ("lora_b", b)):
            qtype = _qtype(quant, tuple(matrix.shape), f"{name}.{suffix}")
            t = _Tensor(name, weights, f"{name}.{suffix}", tuple(matrix.shape), qtype, None)
            data = _convert(t, matrix, permute_rotary)
            writer.add_tensor_info(t.gguf_name, _stored_shape(t), _stored_numpy_dtype(t), _stored_nbytes(t),
                                   raw_dtype=qtype)
            arrays.append(data)
    _write_atomically(writer, out_path, lambda stack: iter(arrays))
    return {
        "path": str(out_path),
        "architecture": gguf.MODEL_ARCH_NAMES[_arch(config)],
        "type": "lora",
        "quant": quant,
        "alpha": alpha,
        "ranks": sorted(ranks),
        "tensors": len(arrays),
        "bytes": out_path.stat().st_size,
    }


# --- what the folder holds ---------------------------------------------------------------------


def _read_config(model_dir: Path) -> dict:
    """config.json, refused unless it is an architecture this writer lays out correctly."""
    if not model_dir.is_dir():
        raise ExportError(f"cannot export {model_dir}: no such folder")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"cannot export {model_dir}: it has no config.json")
    config = load_json(path)
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        shown = f"{model_type!r}" + (f" ({', '.join(archs)})" if archs else "")
        raise ExportError(
            f"cannot export {model_dir} as GGUF: its architecture {shown} is not supported; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise ExportError(f"cannot export {model_dir}: config.json has no integer {key}")
    layout = LAYOUTS[model_type]
    act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    if act != layout.activation:
        raise ExportError(f"cannot export {model_dir}: its activation {act!r} is not the {layout.activation} "
                          f"llama.cpp's {layout.arch.lower()} computes")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if config.get(key) and key not in layout.allowed_flags:
            raise ExportError(f"cannot export {model_dir}: {key} is true, which llama.cpp's "
                              f"{layout.arch.lower()} does not lay out")
    rope = _rope(config)
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ExportError(
            f"cannot export {model_dir}: rope scaling {rope_type!r} is not supported "
            f"(written: {', '.join(ROPE_TYPES)})"
        )
    if rope_type == "linear" and not isinstance(rope.get("factor"), (int, float)):
        raise ExportError(f"cannot export {model_dir}: linear rope scaling without a numeric factor")
    if layout.arch in ("GEMMA2", "GEMMA3"):
        # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B models
        # (found by their layer count); any other query_pre_attn_scalar would be lost.
        scalar = config.get("query_pre_attn_scalar")
        n_layers = int(config["num_hidden_layers"])
        big = n_layers == (46 if layout.arch == "GEMMA2" else 62)
        expected = config["hidden_size"] // config["num_attention_heads"] if big else _head_dim(config)
        if scalar is not None and int(scalar) != expected:
            raise ExportError(f"cannot export {model_dir}: query_pre_attn_scalar {scalar} is not the {expected} "
                              f"llama.cpp's {layout.arch.lower()} scales queries by at {n_layers} layers")
    return config


def _arch(config: dict) -> Any:
    import gguf

    return getattr(gguf.MODEL_ARCH, LAYOUTS[config["model_type"]].arch)


def _rope(config: dict) -> dict:
    """Rotary settings, from transformers 5's `rope_parameters` or the older top-level keys."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if "full_attention" in params:
        params = params["full_attention"]
    rope = dict(params)
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _rope_dims(config: dict) -> int:
    """The rotated dimensions of a head (Phi-4-mini rotates only part of it)."""
    factor = config.get("partial_rotary_factor") or _rope(config).get("partial_rotary_factor") or 1.0
    return int(float(factor) * _head_dim(config))


def _llama3_rope_freqs(config: dict) -> np.ndarray | None:
    """Llama 3.1's rotary scaling as llama.cpp takes it: one divisor per rotated pair (the
    `rope_freqs` tensor), 1 for high frequencies, `factor` for low ones and a smooth blend between,
    as llama.cpp's converter computes it from the config. None for any other scaling."""
    rope = _rope(config)
    if (rope.get("rope_type") or rope.get("type")) != "llama3":
        return None
    dim = _rope_dims(config)
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    wavelen = 2 * np.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, blended))
    return divisors.astype(np.float32)


# --- tensors --------------------------------------------------------------------------------------


def _qtype(quant: str, shape: tuple[int, ...], gguf_name: str) -> Any:
    """The GGML type a tensor is stored in under `quant` (see the module docstring)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or quant == "f32":
        return T.F32
    if quant in ("f16", "bf16"):
        return T[quant.upper()]
    if shape[-1] % Q8_0_BLOCK:
        return T.F16
    if quant != "q8_0" and gguf_name in KEEP_Q8_0:
        return T.Q8_0
    return T[quant.upper()]


def file_types() -> dict[str, Any]:
    """general.file_type for each quant: the writer records it, the checker (export/gguf_check.py)
    reads it back to pick its tolerance."""
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16,
            **{quant: F[f"MOSTLY_{quant.upper()}"] for quant in BLOCK_QUANTS}}


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (a sharded index or one file)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = {name: model_dir / f for name, f in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise ExportError(f"cannot export {model_dir}: weight file {missing[0]} named in its index is missing")
        return files
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ExportError(f"cannot export {model_dir}: it has no model.safetensors (nor a safetensors index)")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def _plan_tensors(model_dir: Path, config: dict, quant: str) -> list[_Tensor]:
    """Every tensor's GGUF name, shape and type, from the safetensors headers (no data read), in
    a fixed order: the embedding, the blocks in order, the final norm, the output layer."""
    import gguf
    from safetensors import safe_open

    files = _weight_files(model_dir)
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    tied = bool(config.get("tie_word_embeddings", False))
    name_map = gguf.get_tensor_name_map(_arch(config), n_layers)
    layout = LAYOUTS[config["model_type"]]

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in files and files[name] == path:
                    shapes[name] = tuple(f.get_slice(name).get_shape())

    planned: list[_Tensor] = []
    for hf_name in sorted(shapes):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope.freq_base
        if hf_name == "lm_head.weight" and tied:
            continue  # read back as tied because output.weight is absent
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base) if suffix in ("weight", "bias") else None
        if gguf_base is None:
            raise ExportError(f"cannot export {model_dir}: tensor {hf_name} has no GGUF name in llama.cpp's {config['model_type']} layout")
        shape = shapes[hf_name]
        qtype = _qtype(quant, shape, f"{gguf_base}.{suffix}")
        heads = None
        if not layout.permute:
            pass
        elif hf_name.endswith("self_attn.q_proj.weight"):
            heads = n_head
        elif hf_name.endswith("self_attn.k_proj.weight"):
            heads = n_kv
        shift = layout.norm_shift if hf_name.endswith("norm.weight") else 0.0
        planned.append(_Tensor(hf_name, files[hf_name], f"{gguf_base}.{suffix}", shape, qtype, heads, shift))
    freqs = _llama3_rope_freqs(config)
    if freqs is not None:
        planned.append(_Tensor("", Path(), "rope_freqs.weight", freqs.shape,
                               gguf.GGMLQuantizationType.F32, None, generated=freqs))
    if not tied and "lm_head.weight" not in shapes:
        raise ExportError(f"cannot export {model_dir}: tie_word_embeddings is false but it has no lm_head.weight")
    names = {t.gguf_name for t in planned}
    if "token_embd.weight" not in names:
        raise ExportError(f"cannot export {model_dir}: it has no model.embed_tokens.weight")
    attn = "attn_qkv" if layout.arch == "PHI3" else "attn_q"
    for i in range(n_layers):
        if f"blk.{i}.{attn}.weight" not in names:
            raise ExportError(f"cannot export {model_dir}: layer {i} has no self_attn."
                              f"{'qkv_proj' if attn == 'attn_qkv' else 'q_proj'}.weight")

    def order(t: _Tensor) -> tuple[int, int, str]:
        m = re.match(r"blk\.(\d+)\.", t.gguf_name)
        if m:
            return (1, int(m.group(1)), t.gguf_name)
        return ({"rope_freqs": -1, "token_embd": 0, "output_norm": 2, "output": 3}.get(t.gguf_name.split(".")[0], 4), 0, t.gguf_name)

    return sorted(planned, key=order)


def _stored_shape(t: _Tensor) -> tuple[int, ...]:
    import gguf

    if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return t.shape
    return tuple(gguf.quants.quant_shape_to_byte_shape(t.shape, t.qtype))


def _stored_numpy_dtype(t: _Tensor) -> np.dtype:
    import gguf

    T = gguf.GGMLQuantizationType
    return np.dtype({T.F32: np.float32, T.F16: np.float16}.get(t.qtype, np.uint8))


def _stored_nbytes(t: _Tensor) -> int:
    return int(np.prod(_stored_shape(t))) * _stored_numpy_dtype(t).itemsize


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from transformers' half-split rotary layout to llama.cpp's
    interleaved one (llama.cpp's `LlamaModel.permute`); transformers' GGUF loader undoes it."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _convert(t: _Tensor, data: np.ndarray, permute: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    import gguf

    if t.permute_heads is not None:
        data = permute(data, t.permute_heads)
    if t.shift:
        data = data + np.float32(t.shift)
    T = gguf.GGMLQuantizationType
    if t.qtype == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if t.qtype == T.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), t.qtype)


def _tensor_data(tensors: list[_Tensor], stack: ExitStack) -> Iterator[np.ndarray]:
    """Each tensor's bytes as stored, one at a time, in the planned order."""
    import torch
    from safetensors import safe_open

    handles: dict[Path, Any] = {}
    for t in tensors:
        if t.generated is not None:
            yield np.ascontiguousarray(t.generated, dtype=np.float32)
            continue
        if t.file not in handles:
            handles[t.file] = stack.enter_context(safe_open(str(t.file), framework="pt"))
        raw = handles[t.file].get_tensor(t.hf_name).to(torch.float32).numpy()
        data = _convert(t, raw, permute_rotary)
        if data.nbytes != _stored_nbytes(t):
            raise ExportError(f"tensor {t.hf_name}: {data.nbytes} bytes where {_stored_nbytes(t)} were planned")
        yield data


# --- metadata -------------------------------------------------------------------------------------


def _add_metadata(writer: Any, model_dir: Path, config: dict, quant: str) -> None:
    """The hyperparameters llama.cpp's converter writes for the architecture, in its order."""
    import gguf

    arch = LAYOUTS[config["model_type"]].arch
    writer.add_type(gguf.GGUFType.MODEL)
    name = model_dir.resolve().name
    # transformers' GGUF loader treats a Llama file named exactly "mistral" as its Mistral class,
    # which it then cannot map; any other name (the folder's, usually) is only shown by runtimes.
    name = f"{name} model" if name == "mistral" else name
    if arch == "PHI3" and not any(k in name.lower() for k in ("phi3", "phi-3")):
        # llama.cpp gives Phi-3's special tokens their rstrip (the newline after <|user|> is part of
        # the token, as in transformers) only when the model's name says Phi-3.
        name = f"{name} (phi3)"
    writer.add_name(name)
    n_head = int(config["num_attention_heads"])
    rope = _rope(config)
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    explicit_head_dim = config.get("head_dim") and int(config["head_dim"]) != int(config["hidden_size"]) // n_head
    if explicit_head_dim or arch in ("GEMMA2", "GEMMA3"):
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    writer.add_file_type(file_types()[quant])
    writer.add_vocab_size(int(config["vocab_size"]))
    if arch in ("LLAMA", "PHI3"):  # the rotated dimensions of a head, which their llama.cpp code reads
        writer.add_rope_dimension_count(_rope_dims(config))
    if (rope.get("rope_type") or rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if arch == "PHI3":
        writer.add_rope_scaling_orig_ctx_len(
            int(config.get("original_max_position_embeddings") or config.get("max_position_embeddings") or 4096))
        writer.add_sliding_window(int(config.get("sliding_window") or 0))
    if arch in ("GEMMA2", "GEMMA3"):
        if arch == "GEMMA2":
            writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 0.0))
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        # Which layers are local (sliding-window) ones, layer by layer, as llama.cpp reads it
        # before it falls back to the family's default pattern.
        layers = config.get("layer_types") or []
        sliding = [t == "sliding_attention" for t in layers]
        if any(sliding):
            writer.add_sliding_window(int(config["sliding_window"]))
            writer.add_sliding_window_pattern(sliding)
        local = (config.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")
        if local is None:
            local = config.get("rope_local_base_freq")
        if local is not None:
            writer.add_rope_freq_base_swa(float(local))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
