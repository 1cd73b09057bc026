"""Preference tuning (method=dpo): TRL's DPOTrainer on our loaded, adapted model, with the arguments,
callbacks, optimizer (LoRA+) and token meter every method shares (train/trainer.py)."""

from __future__ import annotations

import os
from typing import Any

import torch
from trl import DPOTrainer

from tunery.spec import TrainingInputs
from tunery.train.callbacks import TokenMeter
from tunery.train.events import EventSink
from tunery.train.trainer import TrainerBase, equip, our_callbacks


def preference_dataset(rows: list[dict]):
    """Preference rows as TRL's conversational preference dataset: prompt (the input's messages),
    chosen (the preferred output) and rejected (the non-preferred output), each a list of messages."""
    from datasets import Dataset

    from tunery.data.tokenize import chat_messages

    return Dataset.from_list([
        {"prompt": chat_messages(r["input"]["messages"]), "chosen": chat_messages(r["preferred_output"]),
         "rejected": chat_messages(r["non_preferred_output"])}
        for r in rows
    ])


def build_dpo_trainer(model, tokenizer, data, inputs: TrainingInputs, common: dict[str, Any], *, run,
                       sink: EventSink, progress: bool, extra_callbacks: list | None, settings,
                       base: str | None):
    """TRL's DPOTrainer on our loaded, adapted model, with `common` (train.trainer.training_arguments)
    and our callbacks. Returns the trainer, its token meter and the events callback.

    The reference policy: for LoRA and QLoRA the base itself, i.e. the model with its adapter
    disabled (TRL's default with a peft model would keep a frozen copy of the fresh adapter, which
    computes the same numbers); for a full fine-tune the reference log-probs are computed once
    before the first step (precompute_ref_log_probs), so no second copy of the model is held."""
    import datasets
    from peft import PeftModel
    from trl import DPOConfig

    datasets.disable_progress_bars()  # TRL's dataset preparation would draw bars on stderr
    peft = isinstance(model, PeftModel)
    args = DPOConfig(**common, beta=inputs.dpo_beta, max_length=inputs.max_length,
                     precompute_ref_log_probs=not peft)
    meter, events_cb, callbacks = our_callbacks(tokenizer, inputs, run=run, sink=sink, progress=progress,
                                                extra_callbacks=extra_callbacks, checkpoint_minutes=settings.checkpoint_minutes)
    has_val = bool(data.validation) and inputs.run_validation
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # TRL draws a tqdm bar while it precomputes the reference log-probs; our events report progress.
    quiet, os.environ["TQDM_DISABLE"] = os.environ.get("TQDM_DISABLE"), "1"
    try:
        trainer = TuneryDPOTrainer(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=preference_dataset(data.train),
            eval_dataset=preference_dataset(data.validation) if has_val else None,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    finally:
        if quiet is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = quiet
    if peft and "ref" in model.peft_config:
        model.delete_adapter("ref")  # the reference is then the model with its adapter disabled
    for name, p in model.named_parameters():
        # TRL keeps a quantized base's adapter in bf16; ours stays fp32 like the SFT path's (bf16 comes
        # from autocast), so updates smaller than bf16's resolution are not lost.
        if name in trainable and p.dtype != torch.float32:
            p.data = p.data.float()
    equip(trainer, meter, inputs, run=run, base=base)
    return trainer, meter, events_cb


class TuneryDPOTrainer(TrainerBase, DPOTrainer):
    """TRL's DPOTrainer counting tokens for tokens/s: every non-padding token of the chosen and
    rejected sequences (both go through the model), and their completion tokens as trained."""

    meter: TokenMeter

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.meter.add(int(inputs["attention_mask"].sum()), int(inputs["completion_mask"].sum()))
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
