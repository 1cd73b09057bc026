"""The training recipe: JSONL in, tuned adapter out. Reads top to bottom:

  validate data → resolve base → tokenize/pack → load + adapt model → train (HF Trainer)
  → save adapter, tokenizer, manifest, archive.

Every file is fetched and validated before a model is loaded, so a bad line costs
milliseconds, not a model load. The loop itself is transformers' Trainer (accelerate
underneath), so `accelerate launch -m tunery.cli train ...` runs on several GPUs unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunery.artifacts.run import ARCHIVE, CHECKPOINT_DONE, Run
from tunery.errors import OutOfMemoryError, SpecError, TuneryError, is_out_of_memory, out_of_memory_message
from tunery.models.registry import DEFAULT_BASE
from tunery.settings import Settings, get_settings
from tunery.spec import TrainingInputs
from tunery.train.events import EventSink

#: The held-out evaluation after a service training takes at most this share of the training's time.
EVAL_SHARE = 0.10
EVAL_MARGIN = 0.5


@dataclass
class TrainResult:
    """Where a finished run put its outputs, and its headline metrics."""

    run_dir: Path  # the run's local folder (for a run in storage, its local working copy)
    run_url: str  # where the run is: its folder, or its URL in the storage
    adapter_dir: Path
    archive: Path
    manifest: dict[str, Any]
    report: dict[str, Any] | None = None  # the evaluation after training, when test_data was given


@dataclass
class PreparedData:
    """Tokenized, packed training and validation sequences plus the numbers a user wants to see."""

    train: list  # list[data.packing.Sequence]
    validation: list
    stats: dict[str, Any]
    files: dict[str, Any]
    examples: list  # the training sequences as token ids and labels (DPO: each pair's two), for the memory check
    held_out: list = field(default_factory=list)  # the validation rows as read (evaluate_held_out's test set)


def prepare_data(inputs: TrainingInputs, tokenizer, *, settings: Settings, sink: EventSink | None = None,
                 datasets=None) -> PreparedData:
    """Tokenize (masking prompts), truncate, pack and split the already-validated datasets."""
    from tunery.data import pack, padding_fraction, split_train_validation, tokenize_rows, unpacked, wrap

    train_ds, val_ds = datasets if datasets is not None else load_datasets(inputs, settings)
    if inputs.method == "dpo":
        return prepare_preferences(inputs, tokenizer, train_ds, val_ds, sink=sink)
    if inputs.method == "grpo":
        return prepare_prompts(inputs, tokenizer, train_ds, val_ds, sink=sink)
    train_rows, val_rows = split_train_validation(
        train_ds,
        val_ds,
        num_validation_samples=inputs.num_validation_samples,
        run_validation=inputs.run_validation,
    )
    kw: dict[str, Any] = {"max_length": inputs.max_length, "train_on_inputs": inputs.train_on_inputs}
    train_ex = tokenize_rows(train_rows, train_ds.format, tokenizer, **kw)
    val_ex = tokenize_rows(val_rows, (val_ds or train_ds).format, tokenizer, **kw) if val_rows else []
    truncated = sum(e.truncated for e in train_ex) + sum(e.truncated for e in val_ex)
    if truncated and sink is not None:
        sink.emit("warning", message=f"{truncated} rows were longer than {inputs.max_length} tokens and were "
                  "truncated (raise max_seq_length / chunk_size to keep them whole)")
    no_label = [i for i, e in enumerate(train_ex) if all(lab == -100 for lab in e.labels)]
    if len(no_label) == len(train_ex):
        raise TuneryError("no training row has a token to learn from after truncation: raise max_seq_length")

    if inputs.pack_sequences and inputs.wrap_packed_sequences:
        train_seq = wrap(train_ex, inputs.chunk_size)
    elif inputs.pack_sequences:
        train_seq = pack(train_ex, inputs.chunk_size, seed=inputs.seed)
    else:
        train_seq = unpacked(train_ex)
    val_seq = unpacked(val_ex)

    tokens = sum(len(e.input_ids) for e in train_ex)
    trained = sum(sum(lab != -100 for lab in e.labels) for e in train_ex)
    seq_tokens = sum(len(s.input_ids) for s in train_seq)
    stats = {
        "train_rows": len(train_rows),
        "validation_rows": len(val_rows),
        "train_tokens": tokens,
        "trained_tokens": trained,
        "trained_tokens_per_row": round(trained / max(1, len(train_ex)), 2),
        "rows_truncated": truncated,
        "rows_without_labels": len(no_label),
        "sequences": len(train_seq),
        "packing_fill": round(seq_tokens / (len(train_seq) * inputs.chunk_size), 4) if inputs.pack_sequences else None,
        "padding_fraction": round(padding_fraction(train_seq, inputs.micro_batch_size), 4),
        "max_length": inputs.max_length,
    }
    files = {"train_data": file_info(train_ds)}
    if val_ds is not None:
        files["validation_data"] = file_info(val_ds)
    return PreparedData(train_seq, val_seq, stats, files, train_seq, val_rows)


def prepare_preferences(inputs: TrainingInputs, tokenizer, train_ds, val_ds, *,
                        sink: EventSink | None = None) -> PreparedData:
    """Preference rows for DPO, split like SFT rows: `train`/`validation` hold the rows themselves
    (TRL's DPOTrainer tokenizes them); the stats come from tokenizing each pair here the same way
    (chat template; the two answers labelled), so a DPO run reports tokens, truncation and padding
    like an SFT run does. Padding is counted per micro batch of pairs, whose 2 × micro_batch_size
    sequences (preferred ones, then non-preferred ones) TRL pads together."""
    from tunery.data import padding_fraction, preference_examples, split_train_validation, unpacked

    train_rows, val_rows = split_train_validation(
        train_ds, val_ds, num_validation_samples=inputs.num_validation_samples, run_validation=inputs.run_validation
    )
    pairs = preference_examples(train_rows, tokenizer, max_length=inputs.max_length)
    val_pairs = preference_examples(val_rows, tokenizer, max_length=inputs.max_length) if val_rows else []
    truncated = sum(any(e.truncated for e in (p.preferred, p.non_preferred)) for p in pairs + val_pairs)
    if truncated and sink is not None:
        sink.emit("warning", message=f"{truncated} preference rows were longer than {inputs.max_length} tokens and "
                  "were truncated (raise max_seq_length / chunk_size to keep them whole)")
    # TRL drops a pair whose prompt alone fills max_length (truncation left no answer to compare).
    no_label = [i for i, p in enumerate(pairs) if not (p.preferred.labelled_tokens and p.non_preferred.labelled_tokens)]
    if len(no_label) == len(pairs):
        raise TuneryError("no preference row has an answer left after truncation to max_seq_length: raise it")
    if no_label and sink is not None:
        sink.emit("warning", message=f"{len(no_label)} preference rows have a prompt of max_seq_length "
                  f"({inputs.max_length}) tokens or more and are left out")
    batched = []
    m = inputs.micro_batch_size
    for i in range(0, len(pairs), m):
        chunk = pairs[i:i + m]
        batched += [p.preferred for p in chunk] + [p.non_preferred for p in chunk]
    train_examples = [e for p in pairs for e in (p.preferred, p.non_preferred)]
    stats = {
        "train_rows": len(train_rows),
        "validation_rows": len(val_rows),
        "train_tokens": sum(len(e.input_ids) for e in train_examples),
        "trained_tokens": sum(e.labelled_tokens for e in train_examples),
        "trained_tokens_per_row": round(sum(e.labelled_tokens for e in train_examples) / max(1, len(pairs)), 2),
        "rows_truncated": truncated,
        "rows_without_labels": len(no_label),
        "sequences": len(train_examples),
        "packing_fill": None,
        "padding_fraction": round(padding_fraction(unpacked(batched), 2 * m), 4) if batched else 0.0,
        "max_length": inputs.max_length,
    }
    files = {"train_data": file_info(train_ds)}
    if val_ds is not None:
        files["validation_data"] = file_info(val_ds)
    return PreparedData(train_rows, val_rows, stats, files, train_examples, val_rows)


def prepare_prompts(inputs: TrainingInputs, tokenizer, train_ds, val_ds, *,
                    sink: EventSink | None = None) -> PreparedData:
    """RFT prompts for GRPO, split like SFT rows: `train`/`validation` hold the rows themselves
    (TRL's GRPOTrainer renders and samples them). The stats count each prompt's tokens in the chat
    template; the memory check sees each prompt followed by a full-length answer, every answer
    token trained."""
    from tunery.data import prompt_examples, split_train_validation

    train_rows, val_rows = split_train_validation(
        train_ds, val_ds, num_validation_samples=inputs.num_validation_samples, run_validation=inputs.run_validation
    )
    lengths, examples = prompt_examples(train_rows, tokenizer, answer_tokens=inputs.max_completion_length,
                                        schema=inputs.response_schema)
    too_long = sum(n + inputs.max_completion_length > inputs.max_length for n in lengths)
    if too_long and sink is not None:
        sink.emit("warning", message=f"{too_long} prompts plus max_completion_length ({inputs.max_completion_length}) "
                  f"are longer than max_seq_length ({inputs.max_length}) tokens")
    longest = max(lengths, default=0)
    stats = {
        "train_rows": len(train_rows),
        "validation_rows": len(val_rows),
        "train_tokens": sum(lengths),
        "trained_tokens": 0,  # the answers are sampled while training
        "trained_tokens_per_row": 0.0,
        "rows_truncated": 0,
        "rows_without_labels": 0,
        "sequences": len(train_rows) * inputs.num_generations,
        "packing_fill": None,
        "padding_fraction": 0.0,
        "max_length": inputs.max_length,
        "prompt_tokens_max": longest,
        "answers_per_prompt": inputs.num_generations,
    }
    files = {"train_data": file_info(train_ds)}
    if val_ds is not None:
        files["validation_data"] = file_info(val_ds)
    return PreparedData(train_rows, val_rows, stats, files, examples, val_rows)


def check_grader_and_rows(inputs: TrainingInputs, datasets: list, settings: Settings) -> None:
    """method=grpo: the grader can run here (its python source loaded in the sandbox), every row
    has the fields it reads, and rollout_engine=vllm has a server to go to; SpecError naming the
    input, or DataError naming the lines."""
    from tunery.errors import DataError
    from tunery.graders import GraderError, Limits, load_grader, row_errors

    limits = Limits(seconds=settings.grader_seconds, memory_bytes=settings.grader_memory_mb << 20)
    try:
        grader = load_grader(inputs.grader_json, limits=limits, training=True)
    except GraderError as exc:
        raise SpecError(f"invalid training input: {exc}") from None
    if inputs.rollout_engine == "vllm" and not (settings.vllm_url or settings.vllm_command):
        raise SpecError("invalid training input: rollout_engine: vllm samples from a vLLM server serving the base; "
                        "set TUNERY_VLLM_URL to its URL (started with --enable-lora and "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true) or TUNERY_VLLM_COMMAND to start one")
    for ds in datasets:
        if errors := row_errors(grader, ds):
            raise DataError(errors, summary=f"{ds.name}: {len(errors)} of {len(ds.rows)} rows lack what the grader "
                            "reads")


def file_info(ds) -> dict[str, Any]:
    return {"source": ds.name, "sha256": ds.sha256, "rows": len(ds.rows), "format": ds.format}


def load_datasets(inputs: TrainingInputs, settings: Settings):
    """Fetch and fully validate train_data (and validation_data), and check that their format is the
    one `inputs.method` trains on: raises before any compute."""
    from tunery.data import check_method, fetch, read_jsonl

    settings.download_dir.mkdir(parents=True, exist_ok=True)
    options = settings.storage_options
    train_ds = read_jsonl(fetch(inputs.train_data, settings.download_dir, storage=True, storage_options=options),
                          name=inputs.train_data)
    val_ds = None
    if inputs.validation_data and inputs.run_validation:
        val_ds = read_jsonl(fetch(inputs.validation_data, settings.download_dir, storage=True, storage_options=options),
                            name=inputs.validation_data)
    check_method(inputs.method, train_ds)
    if val_ds is not None:
        check_method(inputs.method, val_ds, "validation_data")
    if inputs.method == "grpo":
        check_grader_and_rows(inputs, [d for d in (train_ds, val_ds) if d is not None], settings)
    return train_ds, val_ds


def train(
    inputs: TrainingInputs | dict,
    *,
    base: str = DEFAULT_BASE,
    output_dir: str | Path | None = None,
    resume: bool = False,
    events: EventSink | str | Path | None = None,
    progress: bool = True,
    settings: Settings | None = None,
    callbacks: list | None = None,
    test_data: str | Path | None = None,
    given: dict | None = None,
    pause_file: str | Path | None = None,
    evaluate_held_out: bool = False,
) -> TrainResult:
    """Fine-tune `base` on `inputs.train_data` and write a run (see module docstring, and
    artifacts.Run for what is inside one).

    `output_dir` is the run's local path or storage URL (s3://…: the training works in a local
    cache and copies checkpoints and outputs there). `resume=True` continues from the run's
    newest complete checkpoint. `given` are the inputs as the user gave them, for the manifest
    (default: those set in `inputs`). Emits events to `events` and always to the run's event file. `callbacks` are extra
    transformers TrainerCallbacks (e.g. a notebook's own logging). With `test_data` (a JSONL
    path or URL) the tuned model is evaluated against the base after the last step (eval.json,
    eval.md, loss.png, and the manifest's "eval"); without one, `evaluate_held_out` does the same on
    the rows held out for validation (validation_data's, or train_data's tail: what the service
    does for every training). Once the file `pause_file` exists, the training
    saves a checkpoint after the current step and raises `Paused` (a `paused` event, not `failed`).
    """
    from tunery.spec import parse_inputs

    settings = settings or get_settings()
    if isinstance(inputs, dict):
        inputs = parse_inputs(inputs)
    _check_batch_for_processes(inputs)
    run = settings.run(output_dir if output_dir else settings.runs_dir / _run_name())
    run.work.mkdir(parents=True, exist_ok=True)
    given = given if given is not None else inputs.model_dump(exclude_unset=True)
    # Under `accelerate launch` every process runs this function; only rank 0 reports and writes.
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        sink = events if isinstance(events, EventSink) else EventSink(events)
        sink.add(run.events)
        if progress:  # a person is watching: their log and warning lines on stderr, beside the progress
            sink.listen(_echo_to_stderr)
    else:
        sink, progress = EventSink(), False
    try:
        try:
            result = _train(inputs, given, base, run, resume, sink, progress, settings, callbacks or [], test_data,
                            pause_file, evaluate_held_out)
        except Exception as exc:
            if isinstance(exc, (Paused, TuneryError)) or not is_out_of_memory(exc):
                raise
            raise OutOfMemoryError(out_of_memory_message(exc, inputs)) from exc
    except Paused as exc:
        sink.emit("paused", step=exc.step, checkpoint=exc.checkpoint)
        raise
    except BaseException as exc:
        sink.emit("failed", error=str(exc) or type(exc).__name__, error_type=type(exc).__name__)
        raise
    finally:
        if not isinstance(events, EventSink):
            sink.close()
    return result


def kept_checkpoint(trainer, sink: EventSink) -> dict[str, Any] | None:
    """Which evaluation's weights the training ends with (callbacks.BestCheckpoint), said in a log
    event: {"step", "metric", "value", "last_step", "stopped_early"}; None without a tracked metric."""
    from tunery.train.callbacks import BestCheckpoint, best_metric_name

    key, state = trainer.args.metric_for_best_model, trainer.state
    if not key or state.best_global_step is None or state.best_metric is None:
        return None
    stopper = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BestCheckpoint)), None)
    last = state.global_step
    loaded = trainer.args.load_best_model_at_end and state.best_model_checkpoint is not None
    step = state.best_global_step if loaded else last
    evaluations = [h[key] for h in state.log_history if key in h]
    shown = best_metric_name(key)
    if step == last:
        message = f"kept the last step's weights (step {last}"
        message += f", {shown} {state.best_metric:.4f}, the best of {len(evaluations)} evaluations)" \
            if state.best_global_step == last else ")"
    else:
        message = (f"kept the checkpoint of step {step} ({shown} {state.best_metric:.4f}, the best of "
                   f"{len(evaluations)} evaluations) instead of step {last}'s"
                   + (f" ({evaluations[-1]:.4f})" if evaluations else ""))
    sink.emit("log", message=message)
    return {"step": step, "metric": key.removeprefix("eval_"), "value": state.best_metric if step ==
            state.best_global_step else None, "last_step": last,
            "stopped_early": stopper.stopped_at is not None if stopper else False}


def _echo_to_stderr(event: dict) -> None:
    if event["type"] in ("log", "warning"):
        prefix = "warning: " if event["type"] == "warning" else ""
        print(f"{prefix}{event.get('message', '')}", file=sys.stderr, flush=True)


def _run_name() -> str:
    """A new run directory's name: the time, or under several processes the launcher's run id
    (the same in every process, where each one's clock might name a different directory)."""
    from tunery.models.load import world_size

    if world_size() == 1:
        return time.strftime("run-%Y%m%d-%H%M%S")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or run_id == "none":
        raise SpecError("several processes need one run directory: pass it with -o/--output-dir")
    return f"run-{time.strftime('%Y%m%d')}-{run_id[:12]}"


def _check_batch_for_processes(inputs: TrainingInputs) -> None:
    """train_batch_size is the global batch: under `accelerate launch` it is split over the
    processes, so it must be a multiple of micro_batch_size × processes."""
    from tunery.models.load import world_size

    world = world_size()
    step = inputs.micro_batch_size * world
    if world > 1 and inputs.train_batch_size % step:
        raise SpecError(
            f"invalid training input: train_batch_size ({inputs.train_batch_size}) is the global batch and must "
            f"be a multiple of micro_batch_size ({inputs.micro_batch_size}) × {world} processes, "
            f"e.g. {-(-inputs.train_batch_size // step) * step}"
        )


class Paused(Exception):
    """The training stopped on request after `step`, whose checkpoint a resume goes on from."""

    def __init__(self, step: int):
        from tunery.artifacts.run import checkpoint_name

        self.step, self.checkpoint = step, checkpoint_name(step)
        super().__init__(f"paused after step {step} ({self.checkpoint})")


def _train(inputs: TrainingInputs, given: dict, base: str, run: Run, resume: bool, sink: EventSink,
           progress: bool, settings: Settings, callbacks: list, test_data: str | Path | None,
           pause_file: str | Path | None = None, evaluate_held_out: bool = False) -> TrainResult:
    from tunery.models.load import adapt, load_model, load_tokenizer, pick_device
    from tunery.models.resolve import resolve_base

    started = time.time()
    sink.emit("started", run_dir=run.url, base=base, inputs=given)

    # 1. Data: fetched and validated line by line before anything heavy happens.
    datasets = load_datasets(inputs, settings)
    test_ds = None
    if test_data is not None:
        from tunery.data import fetch, read_jsonl

        test_ds = read_jsonl(fetch(str(test_data), settings.download_dir, storage=True, storage_options=settings.storage_options),
                             name=str(test_data))
    # 2. Base model and tokenizer.
    resolved = resolve_base(base, settings)
    tokenizer = load_tokenizer(resolved, inputs.chat_template)
    data = prepare_data(inputs, tokenizer, settings=settings, sink=sink, datasets=datasets)
    if test_ds is None and evaluate_held_out:
        test_ds = _held_out_set(datasets, data, sink)
    sink.emit("data", **data.stats)
    sink.emit("log", message=_describe_data(data.stats))
    if inputs.early_stopping_patience and not data.validation:
        raise SpecError("invalid training input: early_stopping_patience counts evaluations on a validation set, "
                        "and this training has none: give validation_data or num_validation_samples")

    # 3. Model: refused before it is loaded when it cannot fit this process's device.
    device = pick_device()
    from tunery.models import memory

    devices = memory.local_devices(device)
    estimate, problem = memory.check_training(inputs, resolved.path, data.examples, devices)
    sink.emit("memory", **memory.summary(estimate), capacity=devices.memory, device=devices.description)
    sink.emit("log", message=f"memory: {estimate.describe()} of {devices.description}")
    if problem:
        raise OutOfMemoryError(problem)
    model = load_model(
        resolved,
        precision=inputs.precision,
        quantize_4bit=inputs.peft_method == "qlora",
        attn_implementation=inputs.attn_implementation,
        device=device,
        training=True,
        trainable_base=inputs.peft_method == "full",
    )
    from tunery.train.trainer import training_precision

    chosen = training_precision(inputs, device)
    weights = str(model.dtype).removeprefix("torch.")
    held = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(weights, weights)
    if inputs.peft_method != "full" and chosen.name != "fp32":
        held += " frozen base, fp32 adapter"
    autocast = " autocast" if chosen.name in ("bf16", "fp16") else ""
    sink.emit("log", message=f"precision: {chosen.name}{autocast}, weights {held} ({chosen.reason})")
    # A KV cache during training would also disable packed-sequence detection in the mask code.
    model.config.use_cache = False
    # LoRA's A matrices are initialised from the global RNG: seed it so the same inputs give the
    # same adapter (the Trainer seeds again for shuffling and dropout).
    from transformers import set_seed

    set_seed(inputs.seed)
    model = adapt(
        model,
        method=inputs.peft_method,
        rank=inputs.lora_rank,
        alpha=inputs.lora_alpha,
        dropout=inputs.lora_dropout,
        target_modules=inputs.target_modules,
        gradient_checkpointing=inputs.gradient_checkpointing,
        use_rslora=inputs.use_rslora,
        use_dora=inputs.use_dora,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    sink.emit("log", message=f"{inputs.peft_method}: {trainable:,} trainable of {total:,} parameters on {device}")

    # 4. Train (with the experiment trackers of report_to open, through the last validation).
    from tunery.train.methods import build_trainer
    from tunery.train.tracking import tracking

    if inputs.trackers:
        sink.emit("log", message=f"tracking with {', '.join(inputs.trackers)} as {run.name} in {run.tracking}")
    pauser = None
    if pause_file is not None:
        from tunery.train.callbacks import PauseOnRequest

        pauser = PauseOnRequest(pause_file)
        callbacks = [*callbacks, pauser]
    with tracking(run, inputs, base=base, run_name=run.name):
        trainer, meter, events_cb = build_trainer(
            model, tokenizer, data, inputs, run=run, sink=sink, progress=progress, device=device,
            extra_callbacks=callbacks, settings=settings, run_name=run.name,
            base=base,
        )
        newest = run.newest_checkpoint() if resume else None
        checkpoint = str(newest) if newest is not None else None
        from tunery.models.load import world_size

        processes = world_size()
        sharding = ("fsdp" if getattr(trainer, "is_fsdp_enabled", False) else "ddp") if processes > 1 else None
        if sharding:
            how = "FSDP full sharding" if sharding == "fsdp" else "DDP, a whole model in each"
            sink.emit("log", message=f"{processes} processes ({how})")
            if inputs.fsdp and sharding != "fsdp":
                sink.emit("warning", message=f"fsdp: accelerate shards over GPUs only; these {processes} {device} "
                          "processes train with DDP")
        elif inputs.fsdp:
            sink.emit("log", message="fsdp: one process, nothing to shard over")
        if resume and checkpoint is None:
            sink.emit("log", message="no checkpoint to resume from; starting from step 0")
        if checkpoint:
            sink.emit("log", message=f"resuming from {checkpoint}")
        state = _checkpoint_state(checkpoint)
        if state is not None:
            # The metric history of the steps before the checkpoint, so the manifest covers the whole run.
            events_cb.history = history_from_log(state.get("log_history", []))
            # Replayed, so a reader that missed them (its process died with the previous attempt) has them.
            for record in events_cb.history:
                kind = "step" if "loss" in record else "validation"
                extra = {"max_steps": state.get("max_steps")} if kind == "step" else {}
                sink.emit(kind, **record, **extra, replayed=True)
        if (checkpoint is not None and state is not None
                and 0 < state.get("max_steps", 0) <= state.get("global_step", 0)):
            # The crash came after the last step's checkpoint: the Trainer would run one step past
            # max_steps on resume, so take the final weights as they are instead.
            sink.emit("log", message=f"{checkpoint} holds the final step; saving its weights")
            best = state.get("best_model_checkpoint") if trainer.args.load_best_model_at_end else None
            if best and Path(best).is_dir() and Path(best).name != Path(checkpoint).name:
                checkpoint = best  # as the Trainer would have loaded it back after the last step
            load_checkpoint_weights(trainer.model, checkpoint)
            trainer.state.global_step = state["global_step"]
            for name in ("best_metric", "best_global_step", "best_model_checkpoint"):
                setattr(trainer.state, name, state.get(name))
            losses = [h["loss"] for h in events_cb.history if h.get("loss") is not None]
            train_loss_mean, train_runtime = (sum(losses) / len(losses) if losses else None), 0.0
        else:
            train_out = trainer.train(resume_from_checkpoint=checkpoint)
            if pauser is not None and pauser.paused is not None:
                raise Paused(pauser.paused)
            train_loss_mean, train_runtime = train_out.training_loss, train_out.metrics.get("train_runtime", 0.0)
        kept = kept_checkpoint(trainer, sink)
        final_val, final_eval = None, {}
        if data.validation and inputs.run_validation:
            final_eval = trainer.evaluate()
            final_val = final_eval.get("eval_loss")

    # 5. Save: adapter (or full model), tokenizer, manifest, archive; then to storage.
    full = inputs.peft_method == "full"
    out_dir = run.weights_dir(full)
    sharded = getattr(trainer, "is_fsdp_enabled", False)
    if trainer.is_world_process_zero():
        shutil.rmtree(out_dir, ignore_errors=True)
    if sharded:  # every process hands in its shards; the first writes the whole weights
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(out_dir))
    if not trainer.is_world_process_zero():
        return TrainResult(run_dir=run.work, run_url=run.url, adapter_dir=out_dir, archive=run.work / ARCHIVE,
                           manifest={})
    from tunery.artifacts import build_manifest

    out_name = out_dir.name
    if not sharded:
        trainer.model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(run.tokenizer)
    from tunery.models.load import keep_sentencepiece_model

    keep_sentencepiece_model(resolved.path, run.tokenizer)
    report = None
    if test_ds is not None and sharded:
        sink.emit("warning", message="no evaluation after an FSDP training (its model is sharded over the "
                  f"processes): run `tunery eval {test_ds.name} --weights {run.url} --compare`")
    elif test_ds is not None:
        # The held-out evaluation every service training gets keeps within EVAL_SHARE of the
        # training's own time; a test set the user gave is evaluated whole.
        budget = EVAL_SHARE * (time.time() - started) if test_data is None else None
        report = _evaluate_after_training(trainer.model, tokenizer, test_ds, inputs, sink, progress, budget)
    train_losses = [h["loss"] for h in events_cb.history if h.get("loss") is not None]
    metrics = {
        "train_loss": train_losses[-1] if train_losses else None,
        "train_loss_mean": train_loss_mean,
        "val_loss": final_val,
        "tokens_per_second": round(meter.overall_rate(), 2),
        "real_tokens": meter.real,
        "trained_tokens": meter.trained,
        "steps": trainer.state.global_step,
        "train_runtime_s": round(train_runtime, 2),
        "total_runtime_s": round(time.time() - started, 2),
        "processes": processes,
        "sharding": sharding,
        "padding_fraction": data.stats["padding_fraction"],
        "packing_fill": data.stats["packing_fill"],
        "history": events_cb.history,
        "kept_checkpoint": kept,
    }
    if inputs.method == "sft":
        from tunery.train.callbacks import method_metrics

        metrics["token_accuracy"] = next((h["token_accuracy"] for h in reversed(events_cb.history)
                                          if "token_accuracy" in h), None)
        metrics.update(method_metrics(final_eval, validation=True))
    if inputs.method == "dpo":
        from tunery.train.callbacks import method_metrics

        last_step: dict[str, Any] = next((h for h in reversed(events_cb.history) if "loss" in h), {})
        for name in ("reward_accuracy", "reward_margin"):
            metrics[name] = last_step.get(name)
        metrics.update(method_metrics(final_eval, validation=True))
    if inputs.method == "grpo":
        from tunery.train.callbacks import method_metrics

        last: dict[str, Any] = next((h for h in reversed(events_cb.history) if "reward_mean" in h), {})
        for name in ("reward_mean", "reward_std", "no_spread_share", "completion_length"):
            metrics[name] = last.get(name)
        metrics.update(method_metrics(final_eval, validation=True))
    manifest = build_manifest(
        inputs=inputs, given=given, base=base, resolved=resolved, files=data.files, data_stats=data.stats,
        metrics=metrics, samples=events_cb.samples, output=out_name, device=device,
    )
    run.write_manifest(manifest)
    if report is not None:
        from tunery.eval.report import write_report

        write_report(report, run)  # eval.json, eval.md, loss.png, and the manifest's "eval"
        manifest["eval"] = run.read_manifest()["eval"]
    archive = run.write_archive(out_name)
    summary = (
        f"trained {metrics['steps']} steps in {metrics['train_runtime_s']:.1f}s: "
        f"{metrics['tokens_per_second']:.1f} real tokens/s, padding {data.stats['padding_fraction']:.1%}, "
        f"final loss {metrics['train_loss']}, val loss {final_val}"
    )
    if inputs.method == "grpo":
        summary += f", reward {metrics['reward_mean']} (validation {metrics.get('val_reward_mean')})"
    if inputs.method == "dpo":
        summary += f", reward accuracy {metrics['reward_accuracy']} (validation {metrics.get('val_reward_accuracy')})"
    sink.emit("log", message=summary)
    final = {k: v for k, v in metrics.items() if k != "history"}
    if report is not None:
        final["eval"] = report["metrics"]
        final["eval_seconds"] = report["eval_seconds"]
    run.publish()  # to storage, the archive last; `succeeded` only once all of it is there
    sink.emit("succeeded", run_dir=run.url, weights=str(archive), adapter=str(out_dir), metrics=final)
    run.push_events()
    return TrainResult(run_dir=run.work, run_url=run.url, adapter_dir=out_dir, archive=archive, manifest=manifest,
                       report=report)


def _held_out_set(datasets, data: PreparedData, sink: EventSink):
    """The rows held out for validation as a test set (the first rows of validation_data, or the
    last of train_data), or None, said in a log line, when none were held out."""
    from tunery.data.jsonl import Dataset

    train_ds, val_ds = datasets
    if not data.held_out:
        sink.emit("log", message="no evaluation after training: no rows were held out for validation "
                  "(run_validation is false or num_validation_samples is 0)")
        return None
    source = val_ds or train_ds
    where = "first" if val_ds is not None else "last"
    file = source.name.rstrip("/").rsplit("/", 1)[-1]
    return Dataset(path=source.path, name=f"the {where} rows of {file}, held out",
                   format=source.format, rows=list(data.held_out), lines=[], sha256=source.sha256)


def _evaluate_after_training(model, tokenizer, test_ds, inputs: TrainingInputs, sink: EventSink,
                             progress: bool, budget: float | None = None) -> dict:
    """Tuned vs base on the test set, from the model in memory (the base column runs with the
    adapter disabled; a full fine-tune has no base in memory, so only its own column). With a
    `budget` (seconds), a first batch of rows is timed and the evaluation covers as many of the
    rows, from the first, as fit the budget (all of them when they do): said in the log and the
    report's `rows`."""
    import contextlib

    from tunery.eval.evaluate import Column, evaluate_model

    columns: list[Column] = [("tuned", contextlib.nullcontext)]
    if inputs.peft_method != "full":
        columns.insert(0, ("base", model.disable_adapter))
    scoring: dict[str, Any] = {}
    if test_ds.format == "rft":
        from tunery.graders import load_grader

        scoring = {"grader": load_grader(inputs.grader_json, check=False), "response_format": inputs.response_schema,
                   "max_new_tokens": inputs.max_completion_length}
    batch = max(8, inputs.validation_batch_size)

    def run(rows: list[dict]) -> dict:
        return evaluate_model(model, tokenizer, rows, test_ds.format, columns=columns, batch_size=batch,
                              max_length=inputs.max_length, progress=progress, **scoring)

    rows = test_ds.rows
    started = time.perf_counter()
    if budget is None or len(rows) <= batch:
        sink.emit("log", message=f"evaluating on {test_ds.name} ({len(rows)} rows)")
        report = run(rows)
    else:
        sink.emit("log", message=f"evaluating on {test_ds.name} ({len(rows)} rows; timing the first {batch} "
                  f"against a budget of {budget:.0f} s, {EVAL_SHARE:.0%} of the training's time)")
        report = run(rows[:batch])
        spent = time.perf_counter() - started
        # Half of what the first batch's pace says fits: measured, a longer run of rows cost up to
        # 1.9× the first batch's pace a row (the longest answer sets a batch's decoding length).
        affordable = int(EVAL_MARGIN * (budget - spent) / (spent / batch))
        if affordable > batch:
            report = run(rows[:min(len(rows), affordable)])
        if report["rows"] < len(rows):
            sink.emit("log", message=f"evaluated the first {report['rows']} of the {len(rows)} held-out rows: the "
                      f"evaluation keeps within {EVAL_SHARE:.0%} of the training's time (`tunery eval` scores them "
                      "all)")
    seconds = round(time.perf_counter() - started, 2)
    report.update({"test_data": test_ds.name, "test_sha256": test_ds.sha256, "eval_seconds": seconds})
    sink.emit("eval", test_data=test_ds.name, rows=report["rows"], metrics=report["metrics"], seconds=seconds)
    return report


def _describe_data(s: dict) -> str:
    fill = f", packing fill {s['packing_fill']:.1%}" if s.get("packing_fill") is not None else ""
    return (
        f"data: {s['train_rows']} train rows, {s['validation_rows']} validation rows, {s['train_tokens']} tokens "
        f"({s['trained_tokens']} trained), {s['sequences']} sequences, padding {s['padding_fraction']:.1%}{fill}, "
        f"{s['rows_truncated']} truncated"
    )


def _checkpoint_state(checkpoint: str | None) -> dict | None:
    if checkpoint is None:
        return None
    return json.loads((Path(checkpoint) / CHECKPOINT_DONE).read_text())


def history_from_log(log_history: list[dict]) -> list[dict]:
    """The Trainer's saved log history in the shape of our step/validation records."""
    from tunery.train.callbacks import method_metrics

    out = []
    for h in log_history:
        if "loss" in h:
            out.append({"step": h.get("step"), "epoch": h.get("epoch"), "loss": h["loss"],
                        "learning_rate": h.get("learning_rate"), "grad_norm": h.get("grad_norm"), **method_metrics(h)})
        elif "eval_loss" in h:
            out.append({"step": h.get("step"), "epoch": h.get("epoch"), "val_loss": h["eval_loss"],
                        **method_metrics(h, validation=True)})
    return out


def load_checkpoint_weights(model, checkpoint: str) -> None:
    """Load a checkpoint's trained weights into `model`: the adapter of a peft model, else the
    whole model (safetensors, possibly sharded)."""
    from safetensors.torch import load_file

    folder = Path(checkpoint)
    adapter = folder / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    state = {}
    for f in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("embed" not in m and "lm_head" not in m for m in missing):
        raise TuneryError(f"{checkpoint}: its weights do not fit the model ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected tensors)")
