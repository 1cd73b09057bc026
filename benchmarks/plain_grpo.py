"""The GRPO yardstick: a careful hand-written transformers + peft + TRL `GRPOTrainer` script.

What a practitioner writes from TRL's GRPO docs: the base loaded with `AutoModelForCausalLM`, a
conversational prompt dataset (each prompt a list of messages, so TRL applies the chat template,
the row's other columns passed to the reward function), the reward as a plain Python function, a
`LoraConfig` handed to the trainer as `peft_config`, and `GRPOConfig` with TRL's own defaults except
what the comparison fixes: learning rate, epochs, prompts per step, answers per prompt, answer
length, sampling temperature, micro batch, seed. TRL's defaults stand for everything else (linear
decay without warmup, beta 0 (no reference model), the DAPO loss, rewards scaled by their group's
spread) but one a careful writer changes: TRL's bf16 autocast is kept only where the hardware has
bf16 (a GPU that supports it, a CPU with avx512_bf16 or AMX). On an AVX2-only CPU bf16 is emulated:
with TRL's default the script's step took 6.5 minutes there against tunery's 47–80 s (fp32), so a
comparison of time per step would measure that default alone.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PlainGRPOSettings:
    epochs: int = 1
    prompts_per_step: int = 4
    generations: int = 6
    micro_batch: int = 8
    max_completion_length: int = 32
    temperature: float = 0.7
    learning_rate: float = 1e-4
    seed: int = 42
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = "all-linear"


@dataclass
class PlainGRPOResult:
    adapter_dir: str
    train_runtime_s: float = 0.0
    wall_s: float = 0.0
    steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def native_bf16() -> bool:
    """bf16 that the hardware computes natively: a GPU that supports it, or a CPU with bf16 instructions."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    from common import cpu_info

    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()[1]))


def train_plain_grpo(base_dir: str, rows: list[dict], reward: Callable[[str, dict], float],
                     s: PlainGRPOSettings) -> PlainGRPOResult:
    """GRPO-tune a LoRA adapter on `base_dir` with OpenAI RFT rows (`messages` ending with the user's,
    other fields for the reward); `reward(answer, row)` scores one answer."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer

    started = time.time()
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    set_seed(s.seed)
    answers_per_step = s.prompts_per_step * s.generations
    assert answers_per_step % s.micro_batch == 0
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), learning_rate=s.learning_rate, num_train_epochs=s.epochs,
        per_device_train_batch_size=s.micro_batch, gradient_accumulation_steps=answers_per_step // s.micro_batch,
        num_generations=s.generations, max_completion_length=s.max_completion_length, temperature=s.temperature,
        seed=s.seed, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), bf16=native_bf16(),
    )
    keys = [k for k in rows[0] if k != "messages"]

    def reward_func(prompts, completions, **columns):
        return [reward(c[-1]["content"], {k: columns[k][i] for k in keys}) for i, c in enumerate(completions)]

    dataset = Dataset.from_list([{"prompt": r["messages"], **{k: r[k] for k in keys}} for r in rows])
    trainer = GRPOTrainer(
        model=model, reward_funcs=[reward_func], args=args, processing_class=tok, train_dataset=dataset,
        peft_config=LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                               target_modules=s.target_modules, task_type="CAUSAL_LM"),
    )
    trainer.remove_callback(PrinterCallback)
    out = trainer.train()
    adapter_dir = tempfile.mkdtemp()
    trainer.model.save_pretrained(adapter_dir)
    history = [h for h in trainer.state.log_history if "loss" in h]
    return PlainGRPOResult(adapter_dir=adapter_dir, train_runtime_s=out.metrics["train_runtime"],
                           wall_s=time.time() - started, steps=trainer.state.global_step, history=history)
