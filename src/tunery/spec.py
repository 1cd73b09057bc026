"""The one typed spec of a training's inputs.

The first block of fields is Replicate's Llama 2 training input list: same names, same
defaults, same meaning. The second block holds the knobs practitioners expect from SWIFT,
axolotl and LLaMA-Factory. This model is the CLI's flags (names with dashes), the HTTP
body's `input` and the manifest's `inputs`; each field's description is its help text.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tunery.errors import SpecError

PeftMethod = Literal["lora", "qlora", "full"]
Method = Literal["sft", "dpo", "grpo"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Attention = Literal["auto", "sdpa", "eager", "flash_attention_2"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
# Experiment trackers `report_to` may name: the Trainer's integration, and the package it needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class TrainingInputs(BaseModel):
    """Inputs of one training. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    # -- Replicate's Llama 2 training inputs ------------------------------------------
    train_data: str = Field(
        description="URL or path of a JSONL file; each row is {\"text\": ...}, "
        "{\"prompt\": ..., \"completion\": ...} or {\"messages\": [...]} (with method=dpo: "
        "{\"input\": {\"messages\": [...]}, \"preferred_output\": [...], \"non_preferred_output\": [...]}; with "
        "method=grpo: {\"messages\": [..., {\"role\": \"user\", ...}], plus the fields the grader reads}).",
    )
    num_train_epochs: int = Field(3, ge=1, description="Number of epochs (passes over the training data).")
    train_batch_size: int = Field(
        4, ge=1, description="Global batch size: the number of examples used to compute each gradient "
        "(method=grpo: prompts, each answered num_generations times)."
    )
    micro_batch_size: int = Field(
        4,
        ge=1,
        description="Micro batch size: examples per forward pass; smaller than train_batch_size "
        "turns on gradient accumulation. Must divide train_batch_size (method=grpo: sampled answers per "
        "forward pass, dividing train_batch_size × num_generations).",
    )
    num_validation_samples: int = Field(
        50,
        ge=0,
        description="Validation samples: taken from the tail of train_data when validation_data is not "
        "given, else from the head of validation_data.",
    )
    validation_data: str | None = Field(None, description="URL or path of a JSONL file of validation rows.")
    validation_batch_size: int = Field(
        1, ge=1, description="Batch size for validation (with method=grpo: prompts, each answered "
        "num_generations_eval times)."
    )
    run_validation: bool = Field(True, description="Whether to run validation during training.")
    validation_prompt: str | None = Field(
        None, description="A prompt whose generation is logged at each validation."
    )
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Peak learning rate.")
    pack_sequences: bool = Field(
        False,
        description="Pack whole examples into sequences of up to chunk_size tokens; examples never "
        "attend to each other.",
    )
    wrap_packed_sequences: bool = Field(
        False,
        description="With pack_sequences: concatenate all examples and cut at exactly chunk_size "
        "(constant length, breaks example boundaries).",
    )
    chunk_size: int = Field(2048, ge=16, description="Packed sequence length in tokens.")
    peft_method: PeftMethod = Field(
        "lora", description="lora, qlora (4-bit NF4 base + LoRA) or full (all weights)."
    )
    seed: int = Field(42, ge=0, description="Random seed for shuffling, dropout and initialisation.")
    lora_rank: int = Field(8, ge=1, description="Rank of the LoRA matrices.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha; weights are scaled by alpha/rank.")
    lora_dropout: float = Field(
        0.0, ge=0, lt=1,
        description="Dropout on the LoRA input. 0 by default, as in peft, LLaMA-Factory and unsloth: at the same "
        "quality a LoRA step trains 20-25 % faster without it (benchmarks/NOTES.md, 2026-12-07, sixth sitting); "
        "Replicate's trainer uses 0.05, honoured when given. GRPO samples its answers without dropout, so a "
        "dropout there would learn from another policy than the one sampled (benchmarks/rl_quality.py).",
    )

    # -- Practitioner knobs (SWIFT / axolotl / LLaMA-Factory) -------------------------
    method: Method = Field(
        "sft",
        description="sft: supervised tuning on text, prompt/completion or chat rows; dpo: direct preference "
        "optimization (TRL's DPOTrainer) on preference rows {\"input\": {\"messages\": [...]}, "
        "\"preferred_output\": [...], \"non_preferred_output\": [...]}; the reference is the base (LoRA, "
        "QLoRA: the adapter disabled), dropout is off (TRL's default) and sequences are not packed.",
    )
    dpo_beta: float = Field(
        0.1, gt=0, le=10,
        description="With method=dpo: how far the tuned model may move from the base (lower: further).",
    )
    grader: str | None = Field(
        None,
        description="With method=grpo: what scores each sampled answer, as OpenAI's grader JSON (string_check, "
        "text_similarity, python, score_model or multi); an object, or its JSON text (the CLI also takes a "
        "file: --grader grader.json).",
    )
    num_generations: int = Field(
        8, ge=2, le=64,
        description="With method=grpo: answers sampled per prompt; each is scored against the others of its group.",
    )
    num_generations_eval: int | None = Field(
        None, ge=1, le=64,
        description="With method=grpo: answers sampled per validation prompt (default: num_generations).",
    )
    max_completion_length: int = Field(
        256, ge=1, le=32768, description="With method=grpo: the longest sampled answer, in tokens."
    )
    generation_temperature: float = Field(
        1.0, gt=0, le=2, description="With method=grpo: the sampling temperature of the answers."
    )
    rollout_engine: Literal["auto", "tunery", "transformers", "vllm"] = Field(
        "auto",
        description="With method=grpo: what samples the answers: tunery's serving engine (continuous batching: a "
        "finished answer leaves the batch), transformers' generate as TRL calls it, vllm (the vLLM server of "
        "TUNERY_VLLM_URL or TUNERY_VLLM_COMMAND, the trained adapter loaded into it again at each step; LoRA and "
        "QLoRA), or auto (vllm on a GPU where a vLLM server is configured, else the one measured faster on this "
        "kind of device: benchmarks/rollout_sampling.py).",
    )
    grpo_beta: float = Field(
        0.0, ge=0, le=10,
        description="With method=grpo: weight of the KL penalty toward the base (0, TRL's default: none, so no "
        "reference model is run).",
    )
    response_format: str | None = Field(
        None,
        description="With method=grpo: a JSON schema the answers should follow (OpenAI's response_format); "
        "graders then read each answer's JSON as {{ sample.output_json }}. The schema is shown to the model in "
        "a system message; sampling is not constrained.",
    )
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps (-1: run all epochs).")
    max_seq_length: int | None = Field(
        None, ge=8, description="Rows longer than this many tokens are truncated (default: chunk_size)."
    )
    train_on_inputs: bool = Field(
        False, description="Compute the loss on prompt tokens too (default: completion tokens only)."
    )
    logging_steps: int = Field(1, ge=1, description="Log metrics every N optimizer steps.")
    eval_steps: int | None = Field(
        None, ge=1, description="Validate every N steps (default: at the end of each epoch)."
    )
    save_steps: int | None = Field(
        None, ge=1, description="Checkpoint every N steps (default: at the end of each epoch)."
    )
    save_total_limit: int | None = Field(
        2, ge=1, description="Keep at most this many checkpoints (the best one, when kept, is never deleted)."
    )
    keep_best_checkpoint: bool = Field(
        True,
        description="With a validation set: the weights a training ends with are those of its best evaluation "
        "(lowest validation loss; with method=grpo, highest validation reward), checkpointed when it happens, "
        "and the training says which step it kept. false: the last step's weights.",
    )
    keep_checkpoints_as_versions: bool = Field(
        False,
        description="Service trainings: besides the final weights, add each checkpoint the run keeps "
        "(save_total_limit of them, and the best) to the destination model as a version of its own, oldest "
        "first, so an earlier step can be served or rolled back to. The final weights stay the latest version.",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1,
        description="With a validation set: stop once this many evaluations in a row have not improved on the "
        "best one (the best checkpoint is kept). Default: run every step.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    fsdp: bool = Field(
        False,
        description="When the training runs on several processes (GPUs): shard the weights, gradients and "
        "optimizer state over them (FSDP full sharding), for a base that does not fit one device. Without "
        "it each process holds the whole model (DDP).",
    )
    lora_target_modules: str = Field(
        "all-linear",
        description="Comma-separated module names to adapt (e.g. q_proj,v_proj), or all-linear.",
    )
    lr_scheduler_type: Scheduler = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    loraplus_lr_ratio: float = Field(
        1.0, ge=1, le=64,
        description="LoRA+: the B matrices learn this many times faster than learning_rate (1: plain LoRA, "
        "the default for every method). On real data 2-16 forgot more of the base without scoring "
        "consistently higher (benchmarks/quality.py); 16 can learn a rigid output format in fewer steps.",
    )
    use_rslora: bool = Field(
        False, description="Rank-stabilized LoRA: scale updates by lora_alpha/sqrt(lora_rank) instead of /lora_rank."
    )
    use_dora: bool = Field(
        False, description="DoRA: weight-decomposed LoRA (a learned magnitude per output); slower per step."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    precision: Precision = Field(
        "auto",
        description="Compute precision: fp32, bf16, fp16 or auto (bf16 on a bf16-capable GPU; bf16 autocast on "
        "a CPU with bf16 instructions that a start-up probe measures faster; else fp32).",
    )
    loss_computation: Literal["labelled", "full"] = Field(
        "labelled",
        description="labelled: LM head and loss only at positions with a label (same loss, less compute); "
        "full: the model's own forward over every position.",
    )
    attn_implementation: Attention = Field(
        "auto", description="Attention kernel: sdpa, eager, flash_attention_2 or auto."
    )
    chat_template: str | None = Field(
        None,
        description="The chat template for messages and preference rows: a name (chatml, llama-2, llama-3, mistral, "
        "gemma, phi-3) or a Jinja template. Default: the base tokenizer's own (a base without one, such as base "
        "Llama 2, needs this for chat rows). Saved with the tuned model's tokenizer, so predictions, the OpenAI "
        "chat API, evaluation and the Ollama Modelfile use it.",
    )
    report_to: str = Field(
        "none",
        description="Experiment tracking: none, or comma-separated tensorboard, wandb, mlflow. Files go to the "
        "run's tracking folder; W&B runs offline unless WANDB_MODE or WANDB_API_KEY is set, MLflow writes "
        "there unless MLFLOW_TRACKING_URI is set.",
    )

    @field_validator("chat_template")
    @classmethod
    def _known_chat_template(cls, value: str | None) -> str | None:
        from tunery.chat_templates import chat_template_problem

        if value is not None and (problem := chat_template_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("grader", "response_format", mode="before")
    @classmethod
    def _json_object(cls, value: Any, info: ValidationInfo) -> Any:
        """An object, kept as its JSON text; JSON text must hold an object. A grader may come wrapped
        as {"grader": {...}}, as OpenAI's graders API takes it."""
        import json

        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("must be a JSON object (the CLI reads a file given by its path)") from None
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"must be a JSON object, not {type(value).__name__}")
        if info.field_name == "grader" and set(value) == {"grader"}:
            value = value["grader"]
        return json.dumps(value)

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: str) -> str:
        names = trackers(value)
        for name in names:
            # Whether it is installed, without importing it (the Trainer also takes tensorboardX).
            alternatives = (TRACKERS[name], "tensorboardX") if name == "tensorboard" else (TRACKERS[name],)
            if all(importlib.util.find_spec(package) is None for package in alternatives):
                raise ValueError(f"report_to={name} needs the {TRACKERS[name]} package: pip install {TRACKERS[name]}")
        return ",".join(names) or "none"

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> TrainingInputs:
        if info.context and info.context.get("skip_cross_field_checks"):
            return self
        if problems := cross_field_errors(self):
            raise ValueError("; ".join(f"{field}: {reason}" for field, reason in problems))
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro batches per optimizer step. GRPO's step holds num_generations answers per prompt."""
        if self.method == "grpo":
            return self.train_batch_size * self.num_generations // self.micro_batch_size
        return self.train_batch_size // self.micro_batch_size

    @property
    def grader_json(self) -> dict | None:
        import json

        return json.loads(self.grader) if self.grader else None

    @property
    def response_schema(self) -> dict | None:
        import json

        return json.loads(self.response_format) if self.response_format else None

    @property
    def max_length(self) -> int:
        return self.max_seq_length or self.chunk_size

    @property
    def trackers(self) -> list[str]:
        """The experiment trackers to report to (empty: none)."""
        return trackers(self.report_to)

    @property
    def target_modules(self) -> str | list[str]:
        if self.lora_target_modules.strip() in ("all-linear", "all_linear", "all"):
            return "all-linear"
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]


def trackers(report_to: str) -> list[str]:
    """The tracker names in a `report_to` value, in order, each once; ValueError naming an unknown one."""
    names = [n.strip().lower() for n in report_to.split(",") if n.strip()]
    if names == ["none"]:
        return []
    allowed = ", ".join(["none", *TRACKERS])
    for name in names:
        if name == "none":
            raise ValueError("none cannot be combined with a tracker")
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r} (allowed: {allowed})")
    return list(dict.fromkeys(names))


REPLICATE_INPUTS = (
    "train_data num_train_epochs train_batch_size micro_batch_size num_validation_samples "
    "validation_data validation_batch_size run_validation validation_prompt learning_rate "
    "pack_sequences wrap_packed_sequences chunk_size peft_method seed lora_rank lora_alpha lora_dropout"
).split()


# Checks across fields: (field named in the error, every field the check reads, check).
_CROSS_CHECKS: list[tuple[str, tuple[str, ...], Any]] = [
    ("early_stopping_patience", ("early_stopping_patience", "run_validation"),
     lambda m: "early_stopping_patience counts evaluations, and run_validation is false"
     if m.early_stopping_patience and not m.run_validation else None),
    ("micro_batch_size", ("micro_batch_size", "train_batch_size", "method"),
     lambda m: f"micro_batch_size ({m.micro_batch_size}) must divide train_batch_size ({m.train_batch_size})"
     if m.method != "grpo" and m.train_batch_size % m.micro_batch_size else None),
    ("micro_batch_size", ("micro_batch_size", "train_batch_size", "num_generations", "method"),
     lambda m: f"with method=grpo a micro batch holds sampled answers: micro_batch_size ({m.micro_batch_size}) "
     f"must divide train_batch_size × num_generations ({m.train_batch_size} × {m.num_generations})"
     if m.method == "grpo" and (m.train_batch_size * m.num_generations) % m.micro_batch_size else None),
    ("wrap_packed_sequences", ("wrap_packed_sequences", "pack_sequences"),
     lambda m: "wrap_packed_sequences needs pack_sequences=true"
     if m.wrap_packed_sequences and not m.pack_sequences else None),
    ("fsdp", ("fsdp", "peft_method"),
     lambda m: "fsdp is not available with peft_method=qlora (its 4-bit weights cannot be sharded here); "
     "use lora or full" if m.fsdp and m.peft_method == "qlora" else None),
    ("pack_sequences", ("pack_sequences", "method"),
     lambda m: "pack_sequences is not available with method=dpo (TRL's DPOTrainer pads each preferred and "
     "non-preferred answer as its own sequence)" if m.pack_sequences and m.method == "dpo" else None),
    ("train_on_inputs", ("train_on_inputs", "method"),
     lambda m: "train_on_inputs is not available with method=dpo (DPO compares the log-probabilities of the two "
     "answers only)" if m.train_on_inputs and m.method == "dpo" else None),
    ("fsdp", ("fsdp", "method"),
     lambda m: "fsdp is not available with method=dpo here; use lora or qlora, or full without fsdp"
     if m.fsdp and m.method == "dpo" else None),
    ("grader", ("grader", "method"),
     lambda m: "method=grpo needs a grader (OpenAI's grader JSON) to score the sampled answers"
     if m.method == "grpo" and not m.grader else
     f"a grader scores the answers of method=grpo; method={m.method} does not use one"
     if m.method != "grpo" and m.grader else None),
    ("pack_sequences", ("pack_sequences", "method"),
     lambda m: "pack_sequences is not available with method=grpo (each prompt's answers are sampled and scored "
     "as their own sequences)" if m.pack_sequences and m.method == "grpo" else None),
    ("train_on_inputs", ("train_on_inputs", "method"),
     lambda m: "train_on_inputs is not available with method=grpo (the loss is on the sampled answers only)"
     if m.train_on_inputs and m.method == "grpo" else None),
    ("fsdp", ("fsdp", "method"),
     lambda m: "fsdp is not available with method=grpo here (generation needs the whole model in each process)"
     if m.fsdp and m.method == "grpo" else None),
    ("grpo_beta", ("grpo_beta", "peft_method", "method"),
     lambda m: "grpo_beta > 0 with peft_method=full would hold a second copy of the model as the reference; use "
     "lora or qlora (the reference is then the base, the adapter disabled) or grpo_beta 0"
     if m.method == "grpo" and m.grpo_beta > 0 and m.peft_method == "full" else None),
    ("rollout_engine", ("rollout_engine", "peft_method", "method"),
     lambda m: "rollout_engine=vllm samples with the trained adapter loaded into the vLLM server at each step; "
     "peft_method=full has no adapter to load (use lora or qlora, or rollout_engine tunery or transformers)"
     if m.method == "grpo" and m.rollout_engine == "vllm" and m.peft_method == "full" else None),
    ("max_seq_length", ("max_seq_length", "pack_sequences", "chunk_size"),
     lambda m: f"max_seq_length ({m.max_seq_length}) cannot exceed chunk_size ({m.chunk_size}) when packing"
     if m.max_seq_length is not None and m.pack_sequences and m.max_seq_length > m.chunk_size else None),
]


def cross_field_errors(inputs: TrainingInputs, skip: AbstractSet[str] = frozenset()) -> list[tuple[str, str]]:
    """(field, reason) for each inconsistency between fields, leaving out checks that read a
    field in `skip` (one that is itself invalid)."""
    out = []
    for field, reads, check in _CROSS_CHECKS:
        if skip.isdisjoint(reads) and (reason := check(inputs)):
            out.append((field, reason))
    return out


@dataclass(frozen=True)
class InputError:
    field: str
    reason: str

    def __str__(self) -> str:
        return self.reason if self.reason.startswith(self.field) else f"{self.field}: {self.reason}"


def input_errors(data: Any) -> list[InputError]:
    """Every problem of a dict of inputs at once: each bad field (unknown, missing, wrong type,
    out of range) and each inconsistency among the fields that are valid on their own. Empty
    when the inputs are valid."""
    if not isinstance(data, dict):
        return [InputError("input", "must be an object of training inputs")]
    try:
        TrainingInputs.model_validate(data)
        return []
    except ValidationError as exc:
        errors = _field_errors(exc)
    bad = {e.field.split(".", 1)[0] for e in errors}
    # Validate what is valid on its own, then run the cross-field checks on it.
    clean = {k: v for k, v in data.items() if k in TrainingInputs.model_fields and k not in bad}
    clean.setdefault("train_data", "-")
    try:
        partial = TrainingInputs.model_validate(clean, context={"skip_cross_field_checks": True})
    except ValidationError:  # each remaining field was valid on its own; nothing more to add
        return errors
    return errors + [InputError(f, r) for f, r in cross_field_errors(partial, skip=bad)]


def _field_errors(exc: ValidationError) -> list[InputError]:
    """The errors of single fields; the cross-field validator's own (no field) are left to
    cross_field_errors, which names each."""
    out = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        if not field:
            continue
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown input (not a training input of this model)"
        elif err["type"] == "missing":
            reason = "required"
        out.append(InputError(field, reason))
    return out


def format_input_errors(errors: list[InputError]) -> str:
    return "invalid training input: " + "; ".join(str(e) for e in errors)


def parse_inputs(data: dict[str, Any]) -> TrainingInputs:
    """Validate a dict of inputs; raise SpecError naming every bad field and why, and every
    inconsistency between fields, in one message."""
    if errors := input_errors(data):
        raise SpecError(format_input_errors(errors))
    return TrainingInputs.model_validate(data)
