"""The yardstick: a careful hand-written transformers `Trainer` + peft LoRA script.

What a practitioner writes from the transformers and peft docs: the prompt tokenized with the
tokenizer's special tokens, the completion without them plus EOS, the prompt's labels masked
with -100, `DataCollatorForSeq2Seq` padding, LoRA on all linear layers, fp32, AdamW, the model's
own loss. The quality benchmark, the speed benchmark and the equivalence test all train this
one script, so "the plain script" means the same thing everywhere.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PlainSettings:
    epochs: int = 1
    batch: int = 8
    micro_batch: int = 8
    learning_rate: float = 3e-4
    seed: int = 42
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    schedule: str = "linear"
    warmup: float = 0.0
    max_steps: int = -1


@dataclass
class PlainResult:
    model: Any
    tokenizer: Any
    losses: list[float] = field(default_factory=list)
    real_tokens: int = 0
    train_runtime_s: float = 0.0
    wall_s: float = 0.0
    steps: int = 0


def encode(tok, row: dict) -> dict:
    p = tok(row["prompt"]).input_ids
    c = tok(row["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    return {"input_ids": p + c, "labels": [-100] * len(p) + c}


def train_plain(base_dir: str, rows: list[dict], s: PlainSettings, *, step_losses: bool = False) -> PlainResult:
    """Fine-tune `base_dir` on prompt/completion `rows` (in this order; the Trainer shuffles with
    the seed). `step_losses` records every optimizer step's loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    started = time.time()
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    set_seed(s.seed)  # LoRA's A matrices come from the global RNG
    model = get_peft_model(model, LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    counts = {"real": 0}
    pad = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def collate(features):
        batch = pad(features)
        if model.training:
            counts["real"] += int(batch["attention_mask"].sum())
        return batch

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=s.micro_batch,
        gradient_accumulation_steps=s.batch // s.micro_batch, num_train_epochs=s.epochs, max_steps=s.max_steps,
        learning_rate=s.learning_rate, lr_scheduler_type=s.schedule, warmup_steps=s.warmup, seed=s.seed,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=[encode(tok, r) for r in rows], data_collator=collate)
    trainer.remove_callback(PrinterCallback)  # quiet, like tunery's run: the benchmarks print their own lines
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.eval()
    return PlainResult(model=model, tokenizer=tok, losses=losses if step_losses else losses[-1:],
                       real_tokens=counts["real"], train_runtime_s=out.metrics["train_runtime"],
                       wall_s=time.time() - started, steps=trainer.state.global_step)
