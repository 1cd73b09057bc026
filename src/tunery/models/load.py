"""Load a resolved base model (fp32 | bf16 | fp16 | 4-bit NF4) and adapt it (LoRA | QLoRA | full)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, cast

from tunery.models.precision import resolve_precision
from tunery.models.resolve import ResolvedBase, quiet_transformers


def pick_device() -> str:
    import torch

    if torch.cuda.is_available():
        # Under `accelerate launch` each process owns the GPU of its local rank.
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def world_size() -> int:
    """Processes training together (`accelerate launch` / torchrun set WORLD_SIZE); 1 otherwise."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def pick_dtype(precision: str, device: str, *, training: bool = False, trainable_base: bool = False,
               quantized: bool = False):
    """The dtype a model's weights are loaded in. "auto" is resolved by `resolve_precision`: bf16
    on a bf16-capable GPU, and on a CPU whose bf16 matmuls a probe measured faster; else fp32.
    Training in bf16 runs under autocast; on a CPU a base whose weights are trained (a full
    fine-tune) stays in fp32 there, so that the optimizer updates fp32 masters. A frozen base
    (LoRA) is loaded in bf16, as on a GPU: peft keeps the adapter's own weights in fp32."""
    import torch

    if precision == "auto":
        precision = resolve_precision("auto", device, quantized=quantized).name
        if training and trainable_base and precision == "bf16" and not device.startswith("cuda"):
            return torch.float32  # bf16 autocast computes; the trained weights stay fp32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def pick_attention(name: str, device: str, *, training: bool = False, softcapped: bool = False) -> str:
    """"auto" picks flash_attention_2 on CUDA when the package is installed; for training on a
    CPU, `sdpa_short_eager` (models/attention.py: matrix products for short rows, sdpa for long
    ones); else sdpa. A model that soft-caps its attention scores (`softcapped`: Gemma 2's
    attn_logit_softcapping), which sdpa cannot compute, gets flash_attention_2 or eager."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    if softcapped:
        return "eager"
    if training and not device.startswith("cuda"):
        from tunery.models import attention

        return attention.register()
    return "sdpa"


def softcapped(model_dir: str | Path) -> bool:
    """Whether the model in `model_dir` soft-caps its attention scores (config.json's
    attn_logit_softcapping, set in Gemma 2), which torch's sdpa does not do."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("text_config", config).get("attn_logit_softcapping") is not None


def keep_sentencepiece_model(source: str | Path, tokenizer_dir: str | Path) -> None:
    """Copy `source`'s SentencePiece tokenizer.model beside a saved tokenizer (transformers saves a
    fast tokenizer's tokenizer.json only): the piece scores a GGUF export writes come from it."""
    model = Path(source) / "tokenizer.model"
    if model.is_file() and not (Path(tokenizer_dir) / "tokenizer.model").exists():
        shutil.copyfile(model, Path(tokenizer_dir) / "tokenizer.model")


def load_tokenizer(resolved: ResolvedBase, chat_template: str | None = None):
    """The base's tokenizer, right-padded, with a pad token (eos when the base has none) and the
    `chat_template` input when given (a name or Jinja; data.chat_templates)."""
    from transformers import AutoTokenizer

    from tunery.chat_templates import apply_chat_template

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(resolved.path)
    apply_chat_template(tok, chat_template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(
    resolved: ResolvedBase,
    *,
    precision: str = "auto",
    quantize_4bit: bool = False,
    attn_implementation: str = "auto",
    device: str | None = None,
    training: bool = False,
    trainable_base: bool = False,
):
    """Load the base for training or inference on `device` (default: this process's GPU, else CPU).

    With quantize_4bit the linear layers are NF4 (bitsandbytes; works on CPU too) with double
    quantization, and compute runs in the chosen dtype: with "auto", bf16 on a bf16-capable GPU
    and fp32 elsewhere (a CPU without bf16 hardware runs bf16 matmuls ~20× slower; bitsandbytes'
    CPU 4-bit path is measured only in fp32). `training` picks the attention for training and,
    with `trainable_base` (a full fine-tune: the base's own weights are trained), keeps fp32
    weights on a CPU where bf16 comes from autocast; see `pick_dtype` and `pick_attention`.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or pick_device()
    dtype = pick_dtype(precision, device, training=training, trainable_base=trainable_base, quantized=quantize_4bit)
    attention = pick_attention(attn_implementation, device, training=training, softcapped=softcapped(resolved.path))
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention}
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    if not quantize_4bit:
        # cast: transformers wraps `to` in functools.wraps, whose type mypy does not bind as a method.
        cast(Any, model).to(device)
    return model


def column_major_linears(model) -> list:
    """Store every fp32 CPU linear weight of `model` (`nn.Linear`'s [out, in]) column-major: the
    same values and shape, laid out as its transpose. `F.linear(x, W)` is `x @ Wᵀ`; with Wᵀ
    contiguous, oneDNN/MKL run it as a plain product, which on CPUs for the few rows of a decoding
    step is 2–9× faster than the transposed one (AVX2, 2 threads: SmolLM2-135M's products for 8
    rows 69 → 50 ms a step, one row's unchanged; benchmarks/NOTES.md). Meant for models that only
    infer: a tied input embedding then gathers rows across the layout (8 tokens: 0.07 ms).
    Returns the weights it re-laid."""
    import torch
    from torch import nn

    relaid = []
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        # A tied weight is met twice and re-laid once (it is no longer contiguous the second time);
        # one with a single row or column is both layouts at once.
        if (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
                and min(weight.shape) > 1):
            weight.data = weight.data.t().contiguous().t()
            relaid.append(weight)
    return relaid


@contextlib.contextmanager
def column_major(model):
    """`column_major_linears` for the length of a block (an evaluation's or a rollout's
    generation on a model that is trained or saved afterwards): the weights it re-laid are laid
    back row-major after it."""
    relaid = column_major_linears(model)
    try:
        yield
    finally:
        for weight in relaid:
            weight.data = weight.data.contiguous()


def adapt(model, *, method: str, rank: int, alpha: int, dropout: float, target_modules, gradient_checkpointing: bool,
          use_rslora: bool = False, use_dora: bool = False):
    """Wrap `model` for training: a peft LoRA adapter (lora, qlora) or all weights trainable (full)."""
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # the name since transformers' rename
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=use_rslora,
        use_dora=use_dora,
    )
    from tunery.models.dropout import install as fast_lora_dropout

    model = get_peft_model(model, config)
    fast_lora_dropout(model)
    return model
