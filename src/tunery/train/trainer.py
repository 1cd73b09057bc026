"""What every training method's trainer shares: the TrainingArguments values the spec gives
(`training_arguments`), the Trainer base class (LoRA+ optimizer, the token meter summed over
processes), our callbacks (`our_callbacks`) and what a built trainer gets (`equip`).

Each method is one module building its trainer on these (train/sft.py, train/dpo.py);
train/methods.py picks the module for `inputs.method`. Nothing here imports a method's module.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PrinterCallback, Trainer

from tunery.models.load import world_size
from tunery.models.precision import Precision, resolve_precision
from tunery.spec import TrainingInputs
from tunery.train.callbacks import (
    BestCheckpoint,
    CheckpointsToStorage,
    EventsCallback,
    ProgressCallback,
    TimedCheckpoints,
    TokenMeter,
)
from tunery.train.events import EventSink


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


def training_precision(inputs: TrainingInputs, device: str) -> Precision:
    """The precision a training computes in: `precision` resolved for `device` and the method."""
    return resolve_precision(inputs.precision, device, quantized=inputs.peft_method == "qlora")


def _no_activation_checkpointing() -> dict[str, bool]:
    """The Trainer's own activation checkpointing off, under the name this transformers reads
    (`activation_checkpointing` since 5.x's rename; `gradient_checkpointing`, before it, now
    warns as a deprecated alias)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def training_arguments(model, data, inputs: TrainingInputs, *, run, device: str,
                       run_name: str | None = None) -> dict[str, Any]:
    """The TrainingArguments values every method's trainer takes from the spec (each method's
    module adds its own): checkpoints in the run, batch sizes, schedule, evaluation, precision, the
    trackers of `inputs.report_to` under `run_name` (default: the run's name), FSDP."""
    has_val = bool(data.validation) and inputs.run_validation
    eval_strategy = ("steps" if inputs.eval_steps else "epoch") if has_val else "no"
    bf16 = training_precision(inputs, device).name == "bf16"
    best: dict[str, Any] = {}
    if has_val and (inputs.keep_best_checkpoint or inputs.early_stopping_patience):
        # What "best" means (callbacks.BestCheckpoint): GRPO's evaluation reports the graders' reward.
        grpo = inputs.method == "grpo"
        best = {"metric_for_best_model": "eval_reward" if grpo else "eval_loss", "greater_is_better": grpo}
    return dict(
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
        # Already enabled by models.load.adapt when asked for (TRL's default is on).
        **_no_activation_checkpointing(),
        # Every trainable parameter (LoRA's or, in full fine-tuning, all) is used in each forward:
        # spare DDP the extra graph traversal that looking for unused ones costs every step.
        ddp_find_unused_parameters=False,
        **best,
        **fsdp_arguments(model, inputs),
    )


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


def our_callbacks(tokenizer, inputs: TrainingInputs, *, run, sink: EventSink, progress: bool,
                  extra_callbacks: list | None, checkpoint_minutes: float) -> tuple[TokenMeter, EventsCallback, list]:
    """The token meter and our callbacks, for every method's trainer: events, the best checkpoint
    and early stopping, the progress line, timed checkpoints, storage copies."""
    meter = TokenMeter(world=world_size())
    events_cb = EventsCallback(sink, meter, tokenizer=tokenizer, validation_prompt=inputs.validation_prompt)
    callbacks = ([events_cb, BestCheckpoint(sink, inputs.early_stopping_patience)]
                 + ([ProgressCallback(meter)] if progress else []) + list(extra_callbacks or []))
    if checkpoint_minutes > 0:
        callbacks.append(TimedCheckpoints(checkpoint_minutes * 60))
    if run.remote:
        callbacks.append(CheckpointsToStorage(run))
    return meter, events_cb, callbacks


def equip(trainer: TrainerBase, meter: TokenMeter, inputs: TrainingInputs, *, run, base: str | None) -> None:
    """What every method's trainer gets once built: our events and progress bar replace the
    Trainer's dict printing (which would also corrupt `--events -` on stdout); TensorBoard in the
    run's tracking folder when asked for; the token meter; LoRA+ for an adapter."""
    trainer.remove_callback(PrinterCallback)
    # The best evaluation's weights are loaded back after the last step. Set here rather than in
    # the arguments, whose check wants save steps aligned with evaluation steps: BestCheckpoint
    # saves at each new best itself, whatever the save steps.
    trainer.args.load_best_model_at_end = inputs.keep_best_checkpoint and trainer.args.metric_for_best_model is not None
    if "tensorboard" in inputs.trackers:
        from tunery.train.tracking import add_tensorboard

        add_tensorboard(trainer, run, inputs, base or "")
    trainer.meter = meter
    if inputs.peft_method != "full":
        trainer.loraplus_lr_ratio = inputs.loraplus_lr_ratio
