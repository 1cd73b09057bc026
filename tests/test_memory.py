"""Will it fit? The peak-memory estimate from a base's headers, and the refusal before anything loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import write_jsonl
from tunery.models.memory import estimate_training

COMMON = {"tokens_per_micro_batch": 4 * 256, "weight_bytes": 4, "compute_bytes": 4}


def test_parameter_counts_are_the_models_own(tiny_model_dir):
    """Counted from the safetensors headers alone, they equal what transformers and peft build."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    total = sum(p.numel() for p in model.parameters())
    full = estimate_training(tiny_model_dir, method="full", gradient_checkpointing=False, **COMMON)
    assert full.parameters == total and full.trainable_parameters == total
    for targets, rank in (("all-linear", 8), ("q_proj,v_proj", 4)):
        lora = estimate_training(tiny_model_dir, method="lora", gradient_checkpointing=False, lora_rank=rank,
                                 lora_targets=targets, **COMMON)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                    LoraConfig(r=rank, target_modules=targets if targets == "all-linear"
                                               else targets.split(",")))
        assert lora.trainable_parameters == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_each_lever_moves_the_part_it_should(tiny_model_dir):
    def est(**kw):
        return estimate_training(tiny_model_dir, **{"method": "lora", "gradient_checkpointing": False, **COMMON, **kw})

    lora, full, qlora = est(), est(method="full"), est(method="qlora")
    assert qlora.weights < lora.weights == full.weights and full.trainable > 10 * lora.trainable
    # two layers: checkpointing keeps their inputs and recomputes one layer at a time
    assert est(gradient_checkpointing=True).activations < 0.6 * lora.activations
    assert est(tokens_per_micro_batch=8 * 256).activations == pytest.approx(2 * lora.activations, rel=0.01)
    assert est(labelled_tokens=100).logits < lora.logits  # logits only where there are labels
    assert lora.activations / 2 < est(compute_bytes=2).activations < lora.activations  # norms stay fp32
    assert est(device="cuda").overhead > lora.overhead > 0  # the CUDA context; the CPU process's rest


def big_rows(tmp_path):
    """32 rows of ~8000 tokens: a micro batch of them has logits no CPU here holds."""
    return write_jsonl(tmp_path / "long.jsonl", [{"text": "the red cat sat on the mat " * 1200} for _ in range(32)])


def test_a_training_that_cannot_fit_is_refused_before_the_model_loads(tmp_path, tiny_model_dir):
    from tunery.errors import OutOfMemoryError
    from tunery.train.events import read_events
    from tunery.train.recipe import train

    spec = {"train_data": str(big_rows(tmp_path)), "micro_batch_size": 32, "train_batch_size": 32,
            "max_seq_length": 8192, "chunk_size": 8192, "loss_computation": "full", "run_validation": False}
    with pytest.raises(OutOfMemoryError) as refused:
        train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "run", progress=False)
    message = str(refused.value)
    assert message.startswith("this training would need ~") and "per device, more than" in message
    assert "micro_batch_size 16" in message and "gradient_checkpointing true" in message, message
    events = read_events(tmp_path / "run" / "events.jsonl")
    memory = next(e for e in events if e["type"] == "memory")
    assert memory["total"] > memory["capacity"] and memory["logits"] > memory["activations"]
    assert events[-1]["type"] == "failed" and events[-1]["error_type"] == "OutOfMemoryError"
    assert not (tmp_path / "run" / "adapter").exists()


def test_data_check_reports_the_estimate_and_whether_it_fits(tmp_path, tiny_model_dir, qa_rows):
    def check(data, base, *extra):
        done = subprocess.run([sys.executable, "-m", "tunery.cli", "data", "check", str(data), "--base", base,
                               "--no-estimate", "--json", *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["memory"]

    small = check(write_jsonl(tmp_path / "qa.jsonl", qa_rows), str(tiny_model_dir))
    assert small["fits"] and small["problem"] is None and 0 < small["total"] < small["capacity"]
    # SmolLM2-135M (its headers only: nothing is loaded) on 32 sequences of 8192 tokens a micro batch.
    big_inputs = ["--micro-batch-size", "32", "--train-batch-size", "32", "--max-seq-length", "8192",
                  "--chunk-size", "8192"]
    big = check(big_rows(tmp_path), "smollm2-135m", *big_inputs)
    assert not big["fits"] and big["total"] > big["capacity"] and "would need" in big["problem"]
    assert big["parameters"] == 134515008 and big["activations"] > big["logits"]
    checkpointed = check(big_rows(tmp_path), "smollm2-135m", *big_inputs, "--gradient-checkpointing")
    assert checkpointed["activations"] < big["activations"] / 5
