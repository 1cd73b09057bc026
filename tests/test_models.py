"""Base model resolution: every accepted form, and one-line errors listing what was tried."""

from __future__ import annotations

import pytest

from tunery.errors import ModelNotFoundError
from tunery.models.registry import REGISTRY, smollm2_gguf_path
from tunery.models.resolve import resolve_base


def test_local_directory(tiny_model_dir):
    r = resolve_base(str(tiny_model_dir))
    assert r.kind == "dir" and r.path == str(tiny_model_dir.resolve()) and len(r.sha256) == 64
    assert resolve_base(str(tiny_model_dir)).sha256 == r.sha256  # content hash is stable


def test_hf_id_is_passed_through():
    r = resolve_base("meta-llama/Llama-2-7b-hf")
    assert (r.kind, r.path) == ("hf", "meta-llama/Llama-2-7b-hf")


def test_registry_name_maps_to_hub_id():
    r = resolve_base("llama-2-7b")
    assert (r.kind, r.path) == ("hf", REGISTRY["llama-2-7b"].hf_id)


def test_embedded_default_is_found():
    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


@pytest.mark.parametrize(
    "name, expected",
    [
        ("no-such-model", ["unknown base model 'no-such-model'", "not a registered name", "no local directory",
                           "not a Hugging Face id"]),
        ("/nope/model.gguf", ["no GGUF file at /nope/model.gguf"]),
    ],
)
def test_unknown_base_lists_every_attempt(name, expected):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_base(name)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_base(str(tmp_path))


def test_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf model"):
        resolve_base(str(f))


@pytest.mark.slow
def test_gguf_converted_once_then_fast(tmp_path):
    """The embedded GGUF: first resolve converts (cached as safetensors), later ones are instant."""
    import time

    from tunery.models.load import load_model, load_tokenizer

    r = resolve_base("smollm2-135m")
    assert r.kind == "registry" and (r.path and len(r.sha256) == 64)
    t = time.perf_counter()
    again = resolve_base("smollm2-135m")
    assert again == r and time.perf_counter() - t < 0.5
    t = time.perf_counter()
    model = load_model(r, precision="fp32")
    load_s = time.perf_counter() - t
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert load_s < 5  # reading cached safetensors, not dequantizing again (~30 s)
    tok = load_tokenizer(r)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


@pytest.mark.parametrize(("precision", "compute"), [("auto", "float32"), ("fp32", "float32"), ("bf16", "bfloat16")])
def test_qlora_computes_in_the_models_dtype(tiny_model_dir, precision, compute):
    """On a CPU "auto" is fp32 for 4-bit layers too: bf16 matmuls without bf16 hardware were
    20× slower (7.5 vs 146.5 tokens/s for SmolLM2 QLoRA on a 2-core AVX2 machine)."""
    import bitsandbytes as bnb
    import torch

    from tunery.models.load import load_model

    model = load_model(resolve_base(str(tiny_model_dir)), precision=precision, quantize_4bit=True, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {str(m.compute_dtype).removeprefix("torch.") for m in layers} == {compute}
    assert model.config.quantization_config.bnb_4bit_compute_dtype == getattr(torch, compute)
