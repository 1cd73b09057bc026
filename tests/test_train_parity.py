"""tunery's trainer against the plain transformers Trainer + peft script (benchmarks/plain_script.py).

With the plain script's settings — linear decay, no warmup, one learning rate for every LoRA
matrix (no LoRA+), no packing, fp32, the same seed and rows — tunery's per-step training loss equals the plain script's to 1e-4 over ten steps, with
the labelled-only loss and with the model's own. Differences found on the way, and where each
is handled:

* LoRA's A matrices are drawn from the global RNG when the adapter is made: tunery seeds it
  with `seed` just before (recipe._train); the plain script must do the same (`set_seed`), or
  the two start from different adapters.
* The labelled-only loss runs the decoder itself, outside the model's forward that accelerate
  wraps in autocast, so under bf16 it ran in fp32 (a CPU) or without autocast's fp32 islands (a
  GPU); it now enters the Trainer's autocast itself (sft.TuneryTrainer.compute_loss).
* LoRA dropout: tunery draws its CPU masks from 16-bit uniforms (models/dropout.py), peft from
  torch's Bernoulli generator, so the same seed drops different elements; both run without
  dropout here (models/dropout.py's tests check the masks' statistics). Attention for training
  on a CPU is `sdpa_short_eager` in tunery, sdpa in the plain script: the same function
  (models/attention.py's tests compare them).
* tunery validates on the tail of `train_data` unless told otherwise (Replicate's
  num_validation_samples), so at its defaults it trains on fewer rows than a script given the
  same file; here validation is off, as in the plain script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from plain_script import PlainSettings, train_plain  # noqa: E402

STEPS = 10


@pytest.mark.parametrize("loss_computation", ["labelled", "full"])
@pytest.mark.parametrize("micro_batch", [2])
def test_per_step_loss_equals_the_plain_scripts(tmp_path, tiny_model_dir, loss_computation, micro_batch):
    from tunery.samples import extraction, generate
    from tunery.train.recipe import train

    rows = generate(extraction.make_example, 48, 0)
    settings = PlainSettings(batch=4, micro_batch=micro_batch, learning_rate=1e-3, seed=42, max_steps=STEPS,
                             dropout=0.0)
    plain = train_plain(str(tiny_model_dir), rows, settings, step_losses=True)

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train(
        {"train_data": str(data), "train_batch_size": 4, "micro_batch_size": micro_batch, "learning_rate": 1e-3,
         "seed": 42, "max_steps": STEPS, "lr_scheduler_type": "linear", "warmup_ratio": 0.0,
         "loraplus_lr_ratio": 1, "lora_dropout": 0.0, "run_validation": False, "precision": "fp32", "loss_computation": loss_computation,
         "save_steps": 10**6},
        base=str(tiny_model_dir), output_dir=tmp_path / "run", progress=False,
    )
    ours = [h["loss"] for h in result.manifest["metrics"]["history"] if "loss" in h]

    assert len(plain.losses) == len(ours) == STEPS
    # The loss falls over the ten steps, so equal losses mean equal updates, not just an equal start.
    assert ours[-1] < ours[0] - 0.05
    for step, (a, b) in enumerate(zip(plain.losses, ours, strict=True), start=1):
        assert abs(a - b) <= 1e-4, f"step {step}: plain script {a:.6f}, tunery {b:.6f}"
