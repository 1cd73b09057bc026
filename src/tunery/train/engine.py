"""Builds transformers' Trainer from a TrainingInputs: the spec turned into flat arguments (TRL's
DPOTrainer for method=dpo: train/dpo.py)."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments

from tunery.models.precision import Precision, resolve_precision
from tunery.spec import TrainingInputs
from tunery.train.callbacks import (
    CheckpointsToStorage,
    EventsCallback,
    ProgressCallback,
    TimedCheckpoints,
    TokenMeter,
)
from tunery.train.events import EventSink
from tunery.train.loss import labelled_loss, labelled_loss_through_forward, supports_labelled_loss


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


def fsdp_arguments(model, inputs: TrainingInputs) -> dict[str, Any]:
    """TrainingArguments for FSDP full sharding over the processes, when asked for and there are
    several: each decoder layer is one shard unit; `use_orig_params` keeps LoRA's frozen and
    trainable parameters apart inside a unit."""
    if not inputs.fsdp or world_size() == 1:
        return {}
    layer_classes = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("DecoderLayer")})
    return {"fsdp": "full_shard auto_wrap",
            "fsdp_config": {"transformer_layer_cls_to_wrap": layer_classes, "use_orig_params": True,
                            "sync_module_states": True, "cpu_ram_efficient_loading": False}}


def world_size() -> int:
    """Processes training together (`accelerate launch` / torchrun set WORLD_SIZE); 1 otherwise."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


class TrainerBase(Trainer):
    """What our trainers (supervised and DPO) share. The optimizer: AdamW as the Trainer makes it,
    or with LoRA+ (loraplus_lr_ratio > 1) peft's LoRA+ groups: the B matrices at learning_rate ×
    ratio, everything else at learning_rate. And the token meter, summed over the processes
    when they log."""

    loraplus_lr_ratio: float = 1.0
    meter: TokenMeter

    def log(self, logs, *args, **kwargs):
        # Every process logs at the same steps (the Trainer gathers the loss there): sum the token
        # counts of all processes first, so tokens/s is the whole job's.
        if self.meter.world > 1:
            def reduce_sum(values):
                total = self.accelerator.reduce(torch.tensor(values, device=self.accelerator.device), "sum")
                return [int(v) for v in total.tolist()]

            self.meter.sync(reduce_sum)
        return super().log(logs, *args, **kwargs)

    def create_optimizer(self, model=None):
        if self.loraplus_lr_ratio <= 1 or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        self.optimizer = create_loraplus_optimizer(
            self.model if model is None else model, torch.optim.AdamW, lr=self.args.learning_rate,
            loraplus_lr_ratio=self.loraplus_lr_ratio, loraplus_weight_decay=self.args.weight_decay,
            betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
        )
        return self.optimizer


class TuneryTrainer(TrainerBase):
    """Trainer that counts real and trained tokens as batches pass through compute_loss and, where
    the model allows, computes the LM head and loss only at labelled positions (train/loss.py)."""

    meter: TokenMeter
    labelled_only: bool = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        real = inputs.pop("_real_tokens", None)
        if model.training and real is not None:
            self.meter.add(int(real), int((inputs["labels"] != -100).sum()))
        if not self.labelled_only or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if self.meter.world > 1:  # DDP must run the forward: ask it for the labelled rows' logits only
            loss = labelled_loss_through_forward(model, inputs, num_items_in_batch)
        else:  # one process: decoder, then the LM head in checkpointed chunks of labelled rows
            # This bypasses the model's forward, which accelerate wraps in autocast: enter it here.
            with self.accelerator.autocast():
                loss = labelled_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens; DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        # prediction_step wants outputs: a dict holding only the loss (no logits were made).
        return (loss, {"loss": loss}) if return_outputs else loss


def training_precision(inputs: TrainingInputs, device: str) -> Precision:
    """The precision a training computes in: `precision` resolved for `device` and the method."""
    return resolve_precision(inputs.precision, device, quantized=inputs.peft_method == "qlora")


def build_trainer(model, tokenizer, data, inputs: TrainingInputs, *, run, sink: EventSink,
                  progress: bool, device: str, extra_callbacks: list | None = None,
                  checkpoint_minutes: float = 0.0, run_name: str | None = None, base: str | None = None):
    """A ready Trainer plus the token meter and the events callback (whose history feeds the manifest).
    Checkpoints go to the run (artifacts.Run): copied to its storage as each completes, and also
    saved every `checkpoint_minutes` of training (0: only when the inputs ask). The trackers of
    `inputs.report_to` get `run_name` (default: the run's name) and TensorBoard writes in the
    run's tracking folder, with the inputs and `base` (train/tracking.py opens W&B and MLflow runs)."""
    from tunery.data import Collator

    has_val = bool(data.validation) and inputs.run_validation
    eval_strategy = ("steps" if inputs.eval_steps else "epoch") if has_val else "no"
    bf16 = training_precision(inputs, device).name == "bf16"
    common: dict[str, Any] = dict(
        output_dir=str(run.checkpoints),
        num_train_epochs=inputs.num_train_epochs,
        max_steps=inputs.max_steps,
        per_device_train_batch_size=inputs.micro_batch_size,
        per_device_eval_batch_size=inputs.validation_batch_size,
        gradient_accumulation_steps=inputs.gradient_accumulation_steps // world_size(),
        learning_rate=inputs.learning_rate,
        lr_scheduler_type=inputs.lr_scheduler_type,
        warmup_steps=inputs.warmup_ratio,
        weight_decay=inputs.weight_decay,
        max_grad_norm=inputs.max_grad_norm,
        logging_steps=inputs.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=inputs.eval_steps,
        save_strategy="steps" if inputs.save_steps else "epoch",
        save_steps=inputs.save_steps or 500,
        save_total_limit=inputs.save_total_limit,
        seed=inputs.seed,
        data_seed=inputs.seed,
        bf16=bf16,  # autocast; QLoRA too on a GPU: its 4-bit layers compute in bf16, and so does attention
        fp16=inputs.precision == "fp16",
        use_cpu=device == "cpu",
        report_to=inputs.trackers or "none",
        run_name=run_name or run.name,
        disable_tqdm=True,
        prediction_loss_only=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=device != "cpu",
        optim="adamw_torch",
        gradient_checkpointing=False,  # already enabled by models.load.adapt when asked for (TRL's default is on)
        # Every trainable parameter (LoRA's or, in full fine-tuning, all) is used in each forward:
        # spare DDP the extra graph traversal that looking for unused ones costs every step.
        ddp_find_unused_parameters=False,
        **fsdp_arguments(model, inputs),
    )
    if inputs.method == "dpo":
        from tunery.train.dpo import build_dpo_trainer

        return build_dpo_trainer(model, tokenizer, data, inputs, common, run=run, sink=sink, progress=progress,
                                 extra_callbacks=extra_callbacks, checkpoint_minutes=checkpoint_minutes, base=base)
    args = TrainingArguments(**common, remove_unused_columns=False)
    meter, events_cb, callbacks = our_callbacks(tokenizer, inputs, run=run, sink=sink, progress=progress,
                                                extra_callbacks=extra_callbacks, checkpoint_minutes=checkpoint_minutes)
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
    equip(trainer, meter, inputs, run=run, base=base)
    if inputs.loss_computation == "labelled" and supports_labelled_loss(model):
        trainer.labelled_only = True
        trainer.loss_is_scaled_for_ga = True  # labelled_loss divides by num_items_in_batch itself
    return trainer, meter, events_cb


def our_callbacks(tokenizer, inputs: TrainingInputs, *, run, sink: EventSink, progress: bool,
                  extra_callbacks: list | None, checkpoint_minutes: float) -> tuple[TokenMeter, EventsCallback, list]:
    """The token meter and our callbacks, for either trainer: events, the progress line, timed
    checkpoints, storage copies."""
    meter = TokenMeter(world=world_size())
    events_cb = EventsCallback(sink, meter, tokenizer=tokenizer, validation_prompt=inputs.validation_prompt)
    callbacks = [events_cb] + ([ProgressCallback(meter)] if progress else []) + list(extra_callbacks or [])
    if checkpoint_minutes > 0:
        callbacks.append(TimedCheckpoints(checkpoint_minutes * 60))
    if run.remote:
        callbacks.append(CheckpointsToStorage(run))
    return meter, events_cb, callbacks


def equip(trainer: TrainerBase, meter: TokenMeter, inputs: TrainingInputs, *, run, base: str | None) -> None:
    """What either trainer gets once built: our events and progress bar replace the Trainer's dict
    printing (which would also corrupt `--events -` on stdout); TensorBoard in the run's tracking
    folder when asked for; the token meter; LoRA+ for an adapter."""
    trainer.remove_callback(PrinterCallback)
    if "tensorboard" in inputs.trackers:
        from tunery.train.tracking import add_tensorboard

        add_tensorboard(trainer, run, inputs, base or "")
    trainer.meter = meter
    if inputs.peft_method != "full":
        trainer.loraplus_lr_ratio = inputs.loraplus_ratio
