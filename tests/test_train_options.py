"""Training options beyond Replicate's inputs: precision auto on a CPU, LoRA+, rsLoRA, DoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from tunery.models import precision as prec
from tunery.train.recipe import train


@pytest.fixture
def fresh_precision(monkeypatch):
    """resolve_precision caches its answer per process: clear it around a test that fakes the CPU."""
    prec.resolve_precision.cache_clear()
    yield monkeypatch
    prec.resolve_precision.cache_clear()


def test_auto_is_fp32_on_a_cpu_without_bf16_instructions(fresh_precision):
    fresh_precision.setattr(prec, "cpu_bf16_flags", lambda: [])
    fresh_precision.setattr(prec, "cpu_probe", lambda: pytest.fail("no probe without bf16 instructions"))
    chosen = prec.resolve_precision("auto", "cpu")
    assert chosen.name == "fp32" and "no bf16 instructions" in chosen.reason


@pytest.mark.parametrize(("rates", "expected"), [((100.0, 300.0), "bf16"), ((100.0, 110.0), "fp32")])
def test_auto_follows_the_probe_on_a_cpu_with_bf16(fresh_precision, rates, expected):
    fresh_precision.setattr(prec, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    fresh_precision.setattr(prec, "cpu_probe", lambda: rates)
    chosen = prec.resolve_precision("auto", "cpu")
    assert chosen.name == expected
    assert f"{rates[1]:.0f} GFLOP/s vs fp32 {rates[0]:.0f}" in chosen.reason and "avx512_bf16" in chosen.reason


def test_probe_measures_both_dtypes():
    fp32, bf16 = prec.cpu_probe()
    assert fp32 > 0 and bf16 > 0


def test_bf16_on_a_cpu_keeps_trained_weights_fp32_and_frozen_ones_bf16(fresh_precision):
    from tunery.models.load import pick_dtype

    fresh_precision.setattr(prec, "cpu_bf16_flags", lambda: ["amx_bf16"])
    fresh_precision.setattr(prec, "cpu_probe", lambda: (100.0, 900.0))
    # A full fine-tune's weights are the optimizer's masters: fp32, with autocast computing in bf16.
    assert pick_dtype("auto", "cpu", training=True, trainable_base=True) == torch.float32
    assert pick_dtype("auto", "cpu", training=True) == torch.bfloat16  # a LoRA's frozen base
    assert pick_dtype("auto", "cpu") == torch.bfloat16
    assert pick_dtype("fp32", "cpu") == torch.float32


def _run(tmp_path, qa_rows, tiny_model_dir, name, **inputs):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows)
    spec = {"train_data": str(data), "max_steps": 3, "run_validation": False, "train_batch_size": 4,
            "learning_rate": 1e-3, **inputs}
    return train(spec, base=str(tiny_model_dir), output_dir=tmp_path / name, progress=False,
                 events=tmp_path / f"{name}.jsonl")


def test_bf16_autocast_training_on_a_cpu_logs_why(tmp_path, qa_rows, tiny_model_dir, fresh_precision):
    fresh_precision.setattr(prec, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    fresh_precision.setattr(prec, "cpu_probe", lambda: (100.0, 300.0))
    result = _run(tmp_path, qa_rows, tiny_model_dir, "bf16")
    fp32 = _run(tmp_path, qa_rows, tiny_model_dir, "fp32", precision="fp32")
    logs = [json.loads(line).get("message", "") for line in (tmp_path / "bf16.jsonl").read_text().splitlines()]
    assert any(m.startswith("precision: bf16 autocast, weights bf16 frozen base, fp32 adapter (auto: bf16 matmul 300")
               for m in logs), logs
    adapter = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # the trained weights stayed fp32
    losses = [h["loss"] for h in result.manifest["metrics"]["history"]]
    reference = [h["loss"] for h in fp32.manifest["metrics"]["history"]]
    # bf16 matmuls round: close to the fp32 run, but not bit-equal (it did run in bf16).
    assert losses != reference
    assert all(abs(a - b) < 0.05 for a, b in zip(losses, reference, strict=True))


def test_loraplus_gives_the_b_matrices_a_larger_learning_rate(tmp_path, qa_rows, tiny_model_dir):
    from transformers import TrainerCallback

    seen = {}

    class Groups(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    seen[id(p)] = group["lr"]

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows)
    result = train({"train_data": str(data), "max_steps": 1, "run_validation": False, "learning_rate": 1e-3,
                    "warmup_ratio": 0, "loraplus_lr_ratio": 16},
                   base=str(tiny_model_dir), output_dir=tmp_path / "r", progress=False, callbacks=[Groups()])
    del result
    assert sorted(set(seen.values())) == pytest.approx([1e-3, 16e-3])


def test_rslora_and_dora_reach_the_adapter(tmp_path, qa_rows, tiny_model_dir):
    result = _run(tmp_path, qa_rows, tiny_model_dir, "dora", use_rslora=True, use_dora=True)
    config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["use_dora"] is True
    assert result.manifest["inputs"]["use_dora"] is True


@pytest.mark.parametrize("minutes", [0.0, 1e-9])
def test_checkpoints_also_come_every_few_minutes(tmp_path, qa_rows, tiny_model_dir, minutes):
    from tunery.artifacts import Run
    from tunery.settings import Settings

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows)
    settings = Settings(home=tmp_path / "home", checkpoint_minutes=minutes)
    train({"train_data": str(data), "max_steps": 3, "save_steps": 1000, "save_total_limit": 5,
           "num_validation_samples": 4}, base=str(tiny_model_dir), output_dir=tmp_path / "run", progress=False,
          settings=settings)
    names = Run(tmp_path / "run").checkpoint_names()
    # save_steps alone saves only at the end (step 3); a (tiny) time interval also saves after
    # every step before it.
    assert names == (["checkpoint-3"] if minutes == 0 else ["checkpoint-1", "checkpoint-2", "checkpoint-3"])
