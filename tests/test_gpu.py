"""The CUDA paths, on the tiny model: bf16 by default, fp32 LoRA weights on a bf16 base, QLoRA
with bf16 compute, the attention kernel picked. Skipped where there is no CUDA device (CI);
run them on a GPU machine with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from tunery.train.recipe import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _train(tmp_path, qa_rows, tiny_model_dir, **inputs):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows)
    spec = {"train_data": str(data), "max_steps": 4, "num_validation_samples": 4, "learning_rate": 1e-3, **inputs}
    return train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "run", progress=False)


def test_lora_on_cuda_trains_fp32_adapters_on_a_bf16_base(tmp_path, qa_rows, tiny_model_dir):
    result = _train(tmp_path, qa_rows, tiny_model_dir)
    assert result.manifest["device"].startswith("cuda")
    losses = [h["loss"] for h in result.manifest["metrics"]["history"] if "loss" in h]
    assert len(losses) == 4 and all(0 < x < 100 for x in losses)
    weights = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}  # peft keeps adapters in fp32


def test_qlora_on_cuda_computes_in_bf16(tmp_path, qa_rows, tiny_model_dir):
    import bitsandbytes as bnb

    from tunery.models.load import load_model
    from tunery.models.resolve import resolve_base

    model = load_model(resolve_base(str(tiny_model_dir)), quantize_4bit=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert layers and {m.compute_dtype for m in layers} == {expected}
    result = _train(tmp_path, qa_rows, tiny_model_dir, peft_method="qlora")
    losses = [h["loss"] for h in result.manifest["metrics"]["history"] if "loss" in h]
    assert len(losses) == 4 and all(0 < x < 100 for x in losses)


def test_attention_kernel_on_cuda():
    from tunery.models.load import pick_attention

    try:
        import flash_attn  # noqa: F401

        expected = "flash_attention_2"
    except ImportError:
        expected = "sdpa"
    assert pick_attention("auto", "cuda:0") == expected
