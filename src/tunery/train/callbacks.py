"""Trainer callbacks: events (step metrics, validation, samples, checkpoints) and the progress bar."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback

from tunery.artifacts.run import checkpoint_name
from tunery.train.events import EventSink


class TokenMeter:
    """Counts real (non-padding) and trained (labelled) tokens as batches go through the model.

    `real`/`trained` are the counts of every process. With one process they are this process's
    counts; under `accelerate launch` each process counts its own batches (`add`) and `sync`
    (a collective, which every process calls at the same point: the Trainer's log) sums them."""

    def __init__(self, world: int = 1) -> None:
        self.world = world
        self.real = 0
        self.trained = 0
        self.local_real = 0
        self.local_trained = 0
        self.started = time.perf_counter()
        self._last_real = 0
        self._last_time = self.started

    def add(self, real: int, trained: int) -> None:
        self.local_real += real
        self.local_trained += trained
        if self.world == 1:
            self.real, self.trained = self.local_real, self.local_trained

    def sync(self, reduce_sum) -> None:
        """Set the totals of all processes; `reduce_sum` sums a list of ints across them."""
        if self.world > 1:
            self.real, self.trained = reduce_sum([self.local_real, self.local_trained])

    def rate_since_last(self) -> float:
        """Real tokens per second since the previous call."""
        now = time.perf_counter()
        dt = now - self._last_time
        rate = (self.real - self._last_real) / dt if dt > 0 else 0.0
        self._last_real, self._last_time = self.real, now
        return rate

    def skip(self) -> None:
        """Start the next interval now: time spent validating or saving is not training time."""
        self._last_real, self._last_time = self.real, time.perf_counter()

    def overall_rate(self) -> float:
        dt = time.perf_counter() - self.started
        return self.real / dt if dt > 0 else 0.0


#: TRL's DPO metrics (its log keys) and the names our step events and history give them; a
#: validation record has the same with a val_ prefix (from TRL's eval_ keys).
DPO_METRICS = {
    "rewards/accuracies": "reward_accuracy",
    "rewards/margins": "reward_margin",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "logps/chosen": "logp_chosen",
    "logps/rejected": "logp_rejected",
}


#: TRL's GRPO metrics and our names: the reward's mean and spread over the step's answers, the share
#: of prompts whose answers all scored the same (they teach nothing), the answers' mean length.
#: Each named grader of a multi grader comes as graders/<name> and is called grader_<name>.
GRPO_METRICS = {
    "reward": "reward_mean",
    "reward_std": "reward_std",
    "frac_reward_zero_std": "no_spread_share",
    "completions/mean_length": "completion_length",
    "completions/clipped_ratio": "completion_clipped_share",
    "graders/failed": "grader_failed_share",
    "kl": "kl",
}


#: Supervised tuning's: the share of labelled next tokens that were the model's top choice (TRL's
#: DPO logs the same over the preferred answers' tokens).
SFT_METRICS = {"mean_token_accuracy": "token_accuracy"}


def method_metrics(logs: dict[str, Any], *, validation: bool = False) -> dict[str, Any]:
    """The method's own metrics in a Trainer log (SFT's token accuracy, DPO's or GRPO's), under our names."""
    prefix, name_prefix = ("eval_", "val_") if validation else ("", "")
    known = {**SFT_METRICS, **DPO_METRICS, **GRPO_METRICS}
    out = {name_prefix + ours: logs[prefix + theirs] for theirs, ours in known.items() if prefix + theirs in logs}
    for key, value in logs.items():
        if key.startswith(prefix + "graders/") and key != prefix + "graders/failed":
            out[name_prefix + "grader_" + key[len(prefix + "graders/"):]] = value
    return out


class EventsCallback(TrainerCallback):
    """Turns the Trainer's logs into tunery events and keeps the metric history for the manifest."""

    def __init__(self, sink: EventSink, meter: TokenMeter, *, tokenizer, validation_prompt: str | None,
                 sample_max_new_tokens: int = 64):
        self.sink = sink
        self.meter = meter
        self.tokenizer = tokenizer
        self.validation_prompt = validation_prompt
        self.sample_max_new_tokens = sample_max_new_tokens
        self.history: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.meter.skip()  # the first interval starts with training, not with the Trainer's setup

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "loss" in logs:
            record = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": logs.get("loss"),
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_per_second": round(self.meter.rate_since_last(), 2),
                "tokens_seen": self.meter.real,
                "max_steps": state.max_steps,
                **method_metrics(logs),
            }
            self.history.append(record)
            self.sink.emit("step", **record)
        elif "eval_loss" in logs:
            record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "val_loss": logs["eval_loss"],
                      **method_metrics(logs, validation=True)}
            self.history.append(record)
            self.sink.emit("validation", **record)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self.validation_prompt and model is not None:
            text = generate_sample(model, self.tokenizer, self.validation_prompt, self.sample_max_new_tokens)
            sample = {"step": state.global_step, "prompt": self.validation_prompt, "output": text}
            self.samples.append(sample)
            self.sink.emit("sample", **sample)
        self.meter.skip()

    def on_save(self, args, state, control, **kwargs):
        path = f"{args.output_dir}/{checkpoint_name(state.global_step)}"
        self.sink.emit("checkpoint", step=state.global_step, path=path)
        self.meter.skip()


def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy generation used for the validation_prompt sample; leaves the model in its prior mode."""
    import torch

    was_training = model.training
    model.eval()
    try:
        enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        if was_training:
            model.train()


class ProgressCallback(TrainerCallback):
    """Training progress on stderr: step M/N, epoch, loss, real tokens/s, elapsed and ETA.

    In a terminal, a live rich progress bar. Elsewhere (a log file, a pipe, a container's log)
    a bar cannot redraw, so a plain line is printed every `interval` seconds instead, and at
    the first and last step."""

    def __init__(self, meter: TokenMeter, console: Console | None = None, interval: float = 5.0):
        self.meter = meter
        self.console = console or Console(stderr=True)
        self.interval = interval
        self.progress: Progress | None = None
        self.task = None
        self.loss: float | None = None
        self.val_loss: float | None = None
        self.reward_accuracy: float | None = None  # DPO: how often the preferred answer has the higher reward
        self.token_accuracy: float | None = None  # SFT: the share of labelled next tokens predicted
        self.reward: tuple[float, float] | None = None  # GRPO: the grader's mean score and its spread
        self.started = 0.0
        self.first_step = 0
        self.last_line = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last_line = time.perf_counter()
        self.first_step = state.global_step
        if not self.console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]:.2f}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("val {task.fields[val]}"),
            TextColumn("{task.fields[tps]:.0f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, epoch=0.0, loss="-", val="-", tps=0.0
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(
                self.task, completed=state.global_step, epoch=state.epoch or 0.0, tps=self.meter.overall_rate()
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.loss = logs["loss"]
        if "eval_loss" in logs:
            self.val_loss = logs["eval_loss"]
        if "mean_token_accuracy" in logs:
            self.token_accuracy = logs["mean_token_accuracy"]
        if "rewards/accuracies" in logs:
            self.reward_accuracy = logs["rewards/accuracies"]
        if "reward" in logs and "reward_std" in logs:
            self.reward = (logs["reward"], logs["reward_std"])
        if self.progress is not None:
            if "loss" in logs:
                self.progress.update(self.task, loss=f"{logs['loss']:.4f}{self._extra(short=True)}")
            if "eval_loss" in logs:
                self.progress.update(self.task, val=f"{logs['eval_loss']:.4f}")
            return
        # Plain lines: the Trainer logs after each logging step, so the loss printed is current.
        now = time.perf_counter()
        last = state.global_step >= state.max_steps
        if "loss" in logs and (now - self.last_line >= self.interval or last or state.global_step == self.first_step + 1):
            self.last_line = now
            self.console.print(self.line(state, now), markup=False, highlight=False, soft_wrap=True)

    def line(self, state, now: float) -> str:
        """`step 12/38 (epoch 0.32) loss 1.2345 val 1.3000 | 173 tok/s | elapsed 0:41 | ETA 1:30`
        (SFT: `loss 1.2345 acc 0.62 val ...`, the mean token accuracy; DPO: `loss 0.6931 reward acc 0.75 val ...`; GRPO: `loss 0.0012 reward 0.42±0.31 val ...`)."""
        done = state.global_step - self.first_step
        elapsed = now - self.started
        left = state.max_steps - state.global_step
        eta = _clock(elapsed / done * left) if done > 0 else "-"
        val = f" val {self.val_loss:.4f}" if self.val_loss is not None else ""
        loss = (f"{self.loss:.4f}" if self.loss is not None else "-") + self._extra()
        return (f"train step {state.global_step}/{state.max_steps} (epoch {state.epoch or 0.0:.2f}) loss {loss}{val}"
                f" | {self.meter.overall_rate():.0f} tok/s | elapsed {_clock(elapsed)} | ETA {eta}")

    def _extra(self, short: bool = False) -> str:
        # DPO logs a token accuracy too (TRL's, on the preferred answers): its reward accuracy comes first.
        if self.reward_accuracy is not None:
            return f" {'acc' if short else 'reward acc'} {self.reward_accuracy:.2f}"
        if self.reward is not None:
            return f" reward {self.reward[0]:.2f}±{self.reward[1]:.2f}"
        if self.token_accuracy is not None:
            return f" acc {self.token_accuracy:.2f}"
        return ""

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def agreed(flag: bool, device) -> bool:
    """`flag` of any process training together: a decision to save (or stop) after a step must be
    the same in every process, or the ones that save would wait for the others forever. One
    process: `flag` itself."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    votes = torch.tensor([int(flag)], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


class TimedCheckpoints(TrainerCallback):
    """Save a checkpoint once `seconds` have passed since the last one (or the start), so a long
    epoch loses at most that much work to a crash, whatever the save steps."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        due = time.monotonic() - self.last >= self.seconds and state.global_step < state.max_steps
        if agreed(due, args.device):
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()


class CheckpointsToStorage(TrainerCallback):
    """Copy each checkpoint to the run's storage as soon as the Trainer has saved it (main process
    only), so a training whose machine dies resumes on another one."""

    def __init__(self, run):
        self.run = run

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from pathlib import Path

            self.run.push_checkpoint(Path(args.output_dir) / checkpoint_name(state.global_step))


class PauseOnRequest(TrainerCallback):
    """Pause where the training is: once the file `path` exists (the worker creates it when its job
    is paused), save a checkpoint at the end of the current step and stop, so a resume goes on from
    that very step. Every process stops at the same step. `paused` is the step it stopped at."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.paused: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        asked = self.path.exists() and state.global_step < state.max_steps
        if agreed(asked, args.device):
            control.should_save = True
            control.should_training_stop = True
            self.paused = state.global_step
        return control


class BestCheckpoint(TrainerCallback):
    """The best evaluation's weights, and early stopping. With a validation set the Trainer tracks
    the best value of `args.metric_for_best_model` (the validation loss; GRPO's validation reward)
    in its state, spares the best checkpoint when it rotates old ones and, with
    `load_best_model_at_end`, loads it back after the last step. Here: a checkpoint is saved at
    every evaluation that improves on the best (so the best exists on disk whatever the save
    steps), and with `patience` the training stops once that many evaluations in a row have not
    improved on it. The count is read from the Trainer's log history, so it survives a resume.
    The evaluation after training (recipe) changes nothing."""

    def __init__(self, sink: EventSink, patience: int | None):
        self.sink = sink
        self.patience = patience
        self.training = False
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        key = args.metric_for_best_model
        if not self.training or not key or not metrics or key not in metrics:
            return control
        value = metrics[key]
        best = state.best_metric
        if best is None or (value > best if args.greater_is_better else value < best):
            control.should_save = True  # the Trainer records it as the best right after this call
            return control
        since = [h for h in state.log_history if key in h and h.get("step", 0) > (state.best_global_step or 0)]
        if self.patience and len(since) >= self.patience and state.global_step < state.max_steps:
            control.should_training_stop = True
            self.stopped_at = state.global_step
            shown = best_metric_name(key)
            self.sink.emit("log", message=f"stopping early at step {state.global_step}: {shown} has not improved "
                           f"on {best:.4f} (step {state.best_global_step}) for {len(since)} evaluations "
                           f"(early_stopping_patience {self.patience})")
        return control


def best_metric_name(key: str) -> str:
    """How events name the Trainer's metric_for_best_model: eval_loss → validation loss."""
    return {"eval_loss": "validation loss", "eval_reward": "validation reward"}.get(key, key)
