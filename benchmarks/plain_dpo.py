"""The DPO yardstick: a careful hand-written transformers + peft + TRL `DPOTrainer` script.

What a practitioner writes from TRL's DPO docs: the base loaded with `AutoModelForCausalLM`, a
conversational preference dataset (prompt / chosen / rejected, each a list of messages, so TRL
applies the chat template), a `LoraConfig` handed to the trainer as `peft_config` (TRL then uses
the base with the adapter disabled as the reference), and `DPOConfig` with TRL's own defaults
except what the comparison fixes: learning rate, epochs, batch size, beta, max_length, seed.
TRL's defaults therefore stand for everything else — linear decay without warmup, dropout off,
gradient checkpointing on, bf16 autocast (DPOConfig's `bf16` default), plain AdamW, sigmoid loss.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PlainDPOSettings:
    epochs: int = 3
    batch: int = 4
    learning_rate: float = 1e-4
    beta: float = 0.1
    max_length: int = 2048
    seed: int = 42
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = "all-linear"


@dataclass
class PlainDPOResult:
    adapter_dir: str
    losses: list[float] = field(default_factory=list)
    train_runtime_s: float = 0.0
    wall_s: float = 0.0
    steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def to_trl(row: dict) -> dict:
    """An OpenAI preference row as TRL's conversational preference example."""
    return {"prompt": row["input"]["messages"], "chosen": row["preferred_output"],
            "rejected": row["non_preferred_output"]}


def train_plain_dpo(base_dir: str, rows: list[dict], s: PlainDPOSettings) -> PlainDPOResult:
    """DPO-tune a LoRA adapter on `base_dir` with OpenAI-format preference `rows`; the adapter is
    saved to the returned directory."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, set_seed
    from trl import DPOConfig, DPOTrainer

    started = time.time()
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    set_seed(s.seed)  # LoRA's A matrices come from the global RNG
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(), learning_rate=s.learning_rate, num_train_epochs=s.epochs,
        per_device_train_batch_size=s.batch, beta=s.beta, max_length=s.max_length, seed=s.seed,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = DPOTrainer(
        model=model, args=args, processing_class=tok,
        train_dataset=Dataset.from_list([to_trl(r) for r in rows]),
        peft_config=LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                               target_modules=s.target_modules, task_type="CAUSAL_LM"),
    )
    trainer.remove_callback(PrinterCallback)
    out = trainer.train()
    adapter_dir = tempfile.mkdtemp()
    trainer.model.save_pretrained(adapter_dir)
    history = [h for h in trainer.state.log_history if "loss" in h]
    return PlainDPOResult(adapter_dir=adapter_dir, losses=[h["loss"] for h in history],
                          train_runtime_s=out.metrics["train_runtime"], wall_s=time.time() - started,
                          steps=trainer.state.global_step, history=history)
