"""Load a resolved base model (fp32 | bf16 | fp16 | 4-bit NF4) and adapt it (LoRA | QLoRA | full)."""

from __future__ import annotations

import os
from typing import Any, cast

from tunery.models.resolve import ResolvedBase, quiet_transformers


def pick_device() -> str:
    import torch

    if torch.cuda.is_available():
        # Under `accelerate launch` each process owns the GPU of its local rank.
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def pick_dtype(precision: str, device: str):
    """Resolve a precision name to a torch dtype. "auto" means bf16 on a GPU that supports it,
    fp32 elsewhere."""
    import torch

    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def pick_attention(name: str, device: str) -> str:
    """"auto" picks flash_attention_2 on CUDA when the package is installed, else sdpa."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_tokenizer(resolved: ResolvedBase):
    """The base's tokenizer, right-padded, with a pad token (eos when the base has none)."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(resolved.path)
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
):
    """Load the base for training or inference on `device` (default: this process's GPU, else CPU).

    With quantize_4bit the linear layers are NF4 (bitsandbytes; works on CPU too) with double
    quantization, and compute runs in the chosen dtype: with "auto", bf16 on a bf16-capable GPU
    and fp32 elsewhere (a CPU without bf16 hardware runs bf16 matmuls ~20× slower).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or pick_device()
    dtype = pick_dtype(precision, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": pick_attention(attn_implementation, device)}
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


def adapt(model, *, method: str, rank: int, alpha: int, dropout: float, target_modules, gradient_checkpointing: bool):
    """Wrap `model` for training: a peft LoRA adapter (lora, qlora) or all weights trainable (full)."""
    if gradient_checkpointing:
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
    )
    return get_peft_model(model, config)
