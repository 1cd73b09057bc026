"""Supervised fine-tuning: transformers' Trainer on packed or unpacked token sequences, counting
real and trained tokens and, where the model allows, computing the loss only at labelled positions
(train/loss.py)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainingArguments

from tunery.spec import TrainingInputs
from tunery.train.callbacks import TokenMeter
from tunery.train.events import EventSink
from tunery.train.loss import (
    IGNORE,
    TokenCounts,
    labelled_loss,
    labelled_loss_through_forward,
    supports_labelled_loss,
)
from tunery.train.trainer import TrainerBase, equip, our_callbacks


class SequenceDataset(torch.utils.data.Dataset):
    """Plain list of packed/unpacked sequences as the dicts the collator expects."""

    def __init__(self, sequences):
        self.items = [
            {"input_ids": s.input_ids, "labels": s.labels, "position_ids": s.position_ids} for s in sequences
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class CountingCollator:
    """Wraps the padding collator and records, per batch, how many real and labelled tokens it holds
    (padding excluded), so tokens/s means useful tokens."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        batch = self.inner(features)
        batch["_real_tokens"] = torch.tensor(sum(len(f["input_ids"]) for f in features))
        return batch


class TuneryTrainer(TrainerBase):
    """Trainer that counts real and trained tokens as batches pass through compute_loss and, where
    the model allows, computes the LM head and loss only at labelled positions (train/loss.py).
    It measures the mean token accuracy (the share of labelled next tokens that were the model's
    top choice) of the steps since the last log, and of each evaluation: `mean_token_accuracy`
    and `eval_mean_token_accuracy` in the logs, as TRL's SFTTrainer names them."""

    meter: TokenMeter
    labelled_only: bool = False
    counts: dict[str, TokenCounts]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        real = inputs.pop("_real_tokens", None)
        if model.training and real is not None:
            self.meter.add(int(real), int((inputs["labels"] != -100).sum()))
        counts = self.counts["train" if model.training else "eval"]
        if not self.labelled_only or "labels" not in inputs:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if "labels" in inputs:
                target = inputs["labels"][:, 1:]
                keep = target != IGNORE
                counts.add(outputs["logits"][:, :-1][keep], target[keep])
            return (loss, outputs) if return_outputs else loss
        if self.meter.world > 1:  # DDP must run the forward: ask it for the labelled rows' logits only
            loss = labelled_loss_through_forward(model, inputs, num_items_in_batch, counts)
        else:  # one process: decoder, then the LM head in checkpointed chunks of labelled rows
            # This bypasses the model's forward, which accelerate wraps in autocast: enter it here.
            with self.accelerator.autocast():
                loss = labelled_loss(model, inputs, num_items_in_batch, counts)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens; DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        # prediction_step wants outputs: a dict holding only the loss (no logits were made).
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            accuracy = self._accuracy("train")
            if accuracy is not None:
                logs["mean_token_accuracy"] = accuracy
        return super().log(logs, *args, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self.counts["eval"].take()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        accuracy = self._accuracy("eval")
        if accuracy is not None:
            output.metrics[f"{metric_key_prefix}_mean_token_accuracy"] = accuracy
        return output

    def _accuracy(self, mode: str) -> float | None:
        """The mean token accuracy counted since the last read, over every process."""
        correct, total = self.counts[mode].take()
        pair = torch.tensor([float(correct), float(total)], device=self.accelerator.device)
        if self.meter.world > 1:
            pair = self.accelerator.reduce(pair, "sum")
        return round(float(pair[0] / pair[1]), 6) if pair[1] > 0 else None


def build_sft_trainer(model, tokenizer, data, inputs: TrainingInputs, common: dict[str, Any], *, run,
                      sink: EventSink, progress: bool, extra_callbacks: list | None, settings,
                      base: str | None):
    """transformers' Trainer on our loaded, adapted model, with `common` (train.trainer.training_arguments)
    and our callbacks. Returns the trainer, its token meter and the events callback."""
    from tunery.data import Collator

    has_val = bool(data.validation) and inputs.run_validation
    args = TrainingArguments(**common, remove_unused_columns=False)
    meter, events_cb, callbacks = our_callbacks(tokenizer, inputs, run=run, sink=sink, progress=progress,
                                                extra_callbacks=extra_callbacks, checkpoint_minutes=settings.checkpoint_minutes)
    collator = CountingCollator(Collator(tokenizer.pad_token_id, packed=inputs.pack_sequences
                                         and not inputs.wrap_packed_sequences))
    trainer = TuneryTrainer(
        model=model,
        args=args,
        train_dataset=SequenceDataset(data.train),
        eval_dataset=SequenceDataset(data.validation) if has_val else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.counts = {"train": TokenCounts(), "eval": TokenCounts()}
    equip(trainer, meter, inputs, run=run, base=base)
    if inputs.loss_computation == "labelled" and supports_labelled_loss(model):
        trainer.labelled_only = True
        trainer.loss_is_scaled_for_ga = True  # labelled_loss divides by num_items_in_batch itself
    return trainer, meter, events_cb
