"""Reinforcement fine-tuning (method=grpo): TRL's GRPOTrainer on our loaded, adapted model, its reward
the user's grader (tunery.graders, OpenAI's grader JSON), with the arguments, callbacks, optimizer
and token meter every method shares (train/trainer.py).

Each step samples `num_generations` answers to each of `train_batch_size` prompts, scores every
answer with the grader, and moves the model toward the answers that scored above their group's
mean. An answer the grader cannot score (a python grader that raised, broke a limit or returned
something other than a number in [0, 1]) scores 0; the first few such failures of each kind, and
then their count at each logged step, are `warning` events naming the grader and the reason.

Answers are sampled (`rollout_engine`) by tunery's embedded serving engine over the model being
trained (continuous batching: an answer that ends leaves the batch, instead of padding on to the
longest as `generate` does), by TRL's own call of transformers' `generate`, or by a vLLM server
serving the base (TUNERY_VLLM_URL or TUNERY_VLLM_COMMAND, as for predictions), into which the
adapter being trained is loaded again at each step (`VLLMRollouts`). `auto` is vLLM on a GPU where
a server is configured and the training has an adapter, else the engine
benchmarks/rollout_sampling.py measured faster on the device. Every way, the rollouts use the
weights of the current step; the embedded engine samples with the model in eval mode (no LoRA
dropout while sampling, as vLLM does), TRL's generate in the mode training left it in."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from trl import GRPOTrainer

from tunery.errors import TuneryError
from tunery.graders import Judge, Limits, grade_many
from tunery.infer.weights import Weights
from tunery.models.registry import DEFAULT_BASE
from tunery.spec import TrainingInputs
from tunery.train.callbacks import TokenMeter
from tunery.train.events import EventSink
from tunery.train.trainer import TrainerBase, equip, our_callbacks

#: How many failures of one kind are reported one by one before they are only counted.
SHOWN_FAILURES = 3

#: What `rollout_engine=auto` samples with, by device type (benchmarks/rollout_sampling.py, NOTES.md).
#: Devices not measured keep TRL's own generate.
AUTO_ROLLOUTS = {"cpu": "tunery"}


def rollout_engine(inputs: TrainingInputs, device_type: str, settings) -> str:
    if inputs.rollout_engine != "auto":
        return inputs.rollout_engine
    if device_type == "cuda" and inputs.peft_method != "full" and (settings.vllm_url or settings.vllm_command):
        return "vllm"
    return AUTO_ROLLOUTS.get(device_type, "transformers")


class VLLMRollouts:
    """Rollouts sampled by the vLLM server that serves the base (tunery's vLLM engine, configured
    as for predictions). When the optimizer step has moved on since the last rollouts, the adapter
    being trained is saved (a LoRA adapter: megabytes) and loaded into the server under a new
    name, and the previous step's is unloaded: the answers come from the current weights, as TRL's
    own vLLM mode syncs them. Each answer is a request of its own with its own seed, drawn from
    torch's generator; prompts go as token ids and answers come back as token ids. The server
    reads the adapter from a folder under the tunery home, so it must share that filesystem."""

    def __init__(self, base: str, settings):
        import tempfile

        from tunery.infer.vllm import VLLMEngine

        self.engine = VLLMEngine(base, settings=settings, max_batch=256, max_queue=1 << 16)
        root = settings.home / "vllm"
        root.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="rollouts-", dir=root))
        self.base = base
        self.weights: Weights | None = None
        self.step: int | None = None

    def refresh(self, model, step: int) -> None:
        """Load `model`'s active adapter into the server if `step` differs from the one loaded."""
        if self.weights is not None and step == self.step:
            return
        name = model.active_adapter
        path = self.folder / f"step-{step}"
        model.save_pretrained(str(path), selected_adapters=[name], save_embedding_layers=False)
        previous, self.step = self.weights, step
        self.weights = Weights(kind="adapter", path=path if name == "default" else path / name, tokenizer=None,
                               base=self.base, source=f"the adapter at step {step}")
        if previous is not None:
            self._drop(previous)

    def sample(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
               top_k: int) -> list[list[int]]:
        from tunery.infer.generation import Request, SamplingParams

        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()
        gens = [self.engine.submit(Request(list(ids), SamplingParams(
                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
                    self.weights), block=True)
                for ids, seed in zip(prompt_ids, seeds, strict=True)]
        out = []
        for gen in gens:
            text = gen.text()  # to the end; a server error is raised here
            if text and not gen.token_ids:
                raise TuneryError("the vLLM server answered without token ids; rollout_engine=vllm needs a vLLM "
                                  "that takes return_token_ids (0.10.2 or newer)")
            out.append(list(gen.token_ids))
        return out

    def close(self) -> None:
        import shutil

        try:
            if self.weights is not None:
                self._drop(self.weights)
        finally:
            self.weights = None
            self.engine.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _drop(self, weights: Weights) -> None:
        import shutil

        try:
            self.engine.unload(weights)
        finally:
            shutil.rmtree(self.folder / weights.path.relative_to(self.folder).parts[0], ignore_errors=True)


def engine_rollouts(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                    top_p: float, top_k: int) -> list[list[int]]:
    """Each prompt's sampled answer as token ids (the eos that ended it included), from tunery's
    embedded engine over `model` as it is, all prompts in one continuous batch. Each row's seed
    is drawn from torch's generator, so a seeded training samples the same answers again."""
    from tunery.infer.embedded import EmbeddedEngine
    from tunery.infer.generation import Request, SamplingParams

    seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()
    engine = EmbeddedEngine("rollouts", model=model, tokenizer=tokenizer, max_batch=len(prompt_ids),
                            max_queue=len(prompt_ids))
    was_training = model.training
    model.eval()
    try:
        gens = engine.submit_many([
            Request(list(ids), SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                              top_k=top_k, seed=seed))
            for ids, seed in zip(prompt_ids, seeds, strict=True)])
        for gen in gens:
            for _ in gen:  # to the end; an engine error is raised here
                pass
        return [list(gen.token_ids) for gen in gens]
    finally:
        engine.close()
        if was_training:
            model.train()


def rft_dataset(rows: list[dict], schema: dict | None = None):
    """RFT rows as TRL's conversational prompt dataset: `prompt` (the messages) and `item` (the whole
    row as JSON, which the grader reads as item.*; JSON keeps rows of different shapes in one table)."""
    from datasets import Dataset

    from tunery.data import rft_prompt

    return Dataset.from_list([{"prompt": rft_prompt(r, schema), "item": json.dumps(r)} for r in rows])


class GraderReward:
    """The grader as TRL's reward function: one score per completion, python graders' sandboxes run a
    few at a time. Each named grader of a multi grader is logged as graders/<name>."""

    __name__ = "grader"

    def __init__(self, grader, *, limits: Limits, want_json: bool, sink: EventSink, judge: Judge | None = None,
                 threads: int = 4):
        self.grader, self.limits, self.want_json, self.sink, self.judge = grader, limits, want_json, sink, judge
        self.threads = threads
        self.failures: Counter[str] = Counter()
        self.unreported = 0
        self._lock = threading.Lock()

    def __call__(self, prompts, completions, item, log_metric=None, **_: Any) -> list[float | None]:
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        samples = [(text, json.loads(row)) for text, row in zip(texts, item, strict=True)]
        outcomes = grade_many(self.grader, samples, judge=self.judge, limits=self.limits, want_json=self.want_json,
                              threads=self.threads)
        if log_metric is not None:
            names = {name for o in outcomes for name in o.scores}
            if len(names) > 1 or names != {self.grader.name}:
                for name in sorted(names):
                    values = [o.scores[name] for o in outcomes if name in o.scores]
                    log_metric(f"graders/{name}", sum(values) / len(values))
            log_metric("graders/failed", sum(not o.ok for o in outcomes) / len(outcomes))
        for outcome in outcomes:
            for message in outcome.messages:
                self._failure(message)
        return [o.reward for o in outcomes]

    def _failure(self, message: str) -> None:
        where, _, reason = message.partition(": ")
        kind = f"{where}: {reason[:40]}"  # the same grader failing the same way
        with self._lock:
            self.failures[kind] += 1
            shown = self.failures[kind] <= SHOWN_FAILURES
            if not shown:
                self.unreported += 1
        if shown:
            self.sink.emit("warning", message=f"a sampled answer scored 0: {message}")

    def report(self) -> None:
        """The failures not shown one by one since the last report, as one warning."""
        with self._lock:
            count, self.unreported = self.unreported, 0
        if count:
            self.sink.emit("warning", message=f"{count} more sampled answers scored 0 because the grader failed on "
                           "them (the first of each kind are shown above)")


def build_grpo_trainer(model, tokenizer, data, inputs: TrainingInputs, common: dict[str, Any], *, run,
                       sink: EventSink, progress: bool, extra_callbacks: list | None, settings,
                       base: str | None):
    """TRL's GRPOTrainer on our loaded, adapted model, with `common` (train.trainer.training_arguments)
    and our callbacks. Returns the trainer, its token meter and the events callback.

    Batches: train_batch_size prompts per optimizer step, each answered num_generations times; a
    forward pass holds micro_batch_size answers, so a step accumulates (train_batch_size ×
    num_generations) / micro_batch_size of them, and the answers of one step are sampled together
    (steps_per_generation = that accumulation). With grpo_beta > 0 the reference is the base: for
    LoRA and QLoRA the model with its adapter disabled."""
    import datasets
    from peft import PeftModel
    from trl import GRPOConfig

    from tunery.graders import load_grader

    datasets.disable_progress_bars()
    peft = isinstance(model, PeftModel)
    grader = load_grader(inputs.grader_json, check=False)  # checked with the data, before the model loaded
    limits = Limits(seconds=settings.grader_seconds, memory_bytes=settings.grader_memory_mb << 20)
    schema = inputs.response_schema
    reward = GraderReward(grader, limits=limits, want_json=schema is not None, sink=sink, judge=None)
    # TRL's evaluation batch counts answers and must hold whole groups: validation_batch_size
    # counts prompts here, each answered num_generations_eval (default num_generations) times.
    eval_answers = common["per_device_eval_batch_size"] * (inputs.num_generations_eval or inputs.num_generations)
    args = GRPOConfig(
        **{**common, "logging_steps": inputs.logging_steps, "per_device_eval_batch_size": eval_answers},
        num_generations=inputs.num_generations,
        num_generations_eval=inputs.num_generations_eval,
        max_completion_length=inputs.max_completion_length,
        temperature=inputs.generation_temperature,
        beta=inputs.grpo_beta,
        steps_per_generation=common["gradient_accumulation_steps"],
        shuffle_dataset=True,
        log_completions=False,
    )
    meter, events_cb, callbacks = our_callbacks(tokenizer, inputs, run=run, sink=sink, progress=progress,
                                                extra_callbacks=extra_callbacks, checkpoint_minutes=settings.checkpoint_minutes)
    has_val = bool(data.validation) and inputs.run_validation
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quiet, os.environ["TQDM_DISABLE"] = os.environ.get("TQDM_DISABLE"), "1"
    try:
        trainer = TuneryGRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=args,
            train_dataset=rft_dataset(data.train, schema),
            eval_dataset=rft_dataset(data.validation, schema) if has_val else None,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    finally:
        if quiet is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = quiet
    trainer.reward = reward
    trainer.rollouts = rollout_engine(inputs, trainer.accelerator.device.type, settings)
    if trainer.rollouts == "vllm":  # with an adapter: the inputs' check and rollout_engine's auto rule see to it
        trainer.vllm_rollouts = VLLMRollouts(base or DEFAULT_BASE, settings)
    if peft and "ref" in model.peft_config:
        model.delete_adapter("ref")  # the reference is then the model with its adapter disabled (the base)
    for name, p in model.named_parameters():
        if name in trainable and p.dtype != torch.float32:
            p.data = p.data.float()  # as DPO: the adapter stays fp32 (bf16 comes from autocast)
    equip(trainer, meter, inputs, run=run, base=base)
    return trainer, meter, events_cb


class TuneryGRPOTrainer(TrainerBase, GRPOTrainer):
    """TRL's GRPOTrainer counting tokens for tokens/s: each micro batch's prompt and answer tokens go
    through the model, and the answers' tokens are the ones trained."""

    meter: TokenMeter
    reward: GraderReward
    rollouts: str = "transformers"  # or "tunery" (see engine_rollouts) or "vllm" (VLLMRollouts)
    vllm_rollouts: VLLMRollouts | None = None

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        plain = (self.rollouts == "transformers" or self.use_vllm or images or multimodal_fields
                 or (self.min_p or 0) > 0 or self.repetition_penalty != 1.0 or self.args.generation_kwargs)
        if plain:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images=has_tool_images)
        if self.vllm_rollouts is not None:
            self.vllm_rollouts.refresh(self.accelerator.unwrap_model(self.model), self.state.global_step)
            return self.vllm_rollouts.sample(prompt_ids, max_new_tokens=self.max_completion_length,
                                             temperature=self.temperature, top_p=self.top_p,
                                             top_k=self.top_k or 0), None
        from trl.models import unwrap_model_for_generation

        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                          gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
              as model, torch.no_grad(), self._dist.summon_full_params(self.model_wrapped, recurse=False)):
            completions = engine_rollouts(model, self._tokenizer, prompt_ids,
                                          max_new_tokens=self.max_completion_length, temperature=self.temperature,
                                          top_p=self.top_p, top_k=self.top_k or 0)
        return completions, None

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.vllm_rollouts is not None:
                self.vllm_rollouts.close()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            prompt = int(inputs["prompt_mask"].sum())
            completion = int(inputs["completion_mask"].sum())
            self.meter.add(prompt + completion, completion)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            self.reward.report()
        return super().log(logs, *args, **kwargs)
