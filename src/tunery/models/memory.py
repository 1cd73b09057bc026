"""Will a training fit? An estimate of its peak memory per device, made from the base's config and
safetensors headers alone (nothing is loaded), and the memory this machine's devices have.

The estimate adds four parts, each from what the training keeps alive at its peak (the backward
pass of the first layer):

- **weights**: the base as it is loaded: bf16/fp32 for LoRA, NF4 with double quantization for
  QLoRA's linear layers (its embeddings and norms in fp32), and for a full fine-tune the dtype
  its weights are trained in (fp32 on a CPU, where bf16 comes from autocast);
- **trainable**: for each trainable weight its gradient and AdamW's two moments, and for LoRA's
  fp32 matrices the weight too (16 bytes a parameter); a full fine-tune's in its weights' dtype;
- **activations**: what autograd saves per token per layer for a Llama-shaped decoder (the
  norms' inputs, q/k/v before and after rotary, the attention output, the MLP's gate, up,
  activation and product, and LoRA dropout's copies of each adapted input), times the tokens
  of one micro batch and the layers; with gradient checkpointing only each layer's input is kept
  and one layer's activations are recomputed at a time;
- **logits**: the loss's logits in fp32, their log-softmax and the gradients of both, for the
  rows alive at once (labelled loss: at most train.loss.CHUNK_ROWS rows; full loss: every token).

Each device adds a measured overhead (OVERHEAD_CUDA: its context and kernels; OVERHEAD_CPU: the
rest of the training process). benchmarks/memory_estimate.py compares the estimate with measured
peaks (benchmarks/NOTES.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
#: A CUDA context, cuBLAS workspaces and the allocator's slack (torch 2.x on an H100-class GPU).
OVERHEAD_CUDA = int(0.8 * GIB)
#: On a CPU, what the training process holds beyond the four parts (the Trainer, the data, the
#: tokenizer, the allocator's slack): benchmarks/memory_estimate.py measured 0.5-0.8 GiB of
#: SmolLM2-135M trainings' peak RSS growth left over by the parts (LoRA, LoRA with gradient
#: checkpointing, full).
OVERHEAD_CPU = int(0.6 * GIB)
#: Bytes of an NF4 weight with double quantization: 4 bits, plus an 8-bit absmax per 64 weights and
#: a fp32 constant per 256 absmaxes.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
#: Rows of logits alive at once under the labelled loss (train/loss.py's CHUNK_ROWS).
LOSS_CHUNK_ROWS = 2048


@dataclass(frozen=True)
class Estimate:
    """A training's peak memory on one device, in bytes, by part."""

    weights: int
    trainable: int
    activations: int
    logits: int
    overhead: int
    parameters: int
    trainable_parameters: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.logits + self.overhead

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights, "trainable": self.trainable, "activations": self.activations,
                "logits": self.logits, "overhead": self.overhead, "total": self.total}

    def describe(self) -> str:
        return (f"~{gib(self.total)} (weights {gib(self.weights)}, optimizer and gradients {gib(self.trainable)}, "
                f"activations {gib(self.activations)}, logits {gib(self.logits)}"
                + f", runtime {gib(self.overhead)})")


def gib(n: float) -> str:
    if n < GIB:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


def weight_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the base's safetensors files, read from their headers."""
    from safetensors import safe_open

    folder = Path(model_dir)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        [p.name for p in folder.glob("*.safetensors")]
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def estimate_training(model_dir: str | Path, *, method: str, tokens_per_micro_batch: int,
                      gradient_checkpointing: bool, weight_bytes: int, compute_bytes: int, lora_rank: int = 8,
                      lora_targets: str = "all-linear", lora_dropout: float = 0.0,
                      labelled_tokens: int | None = None, device: str = "cpu") -> Estimate:
    """The peak memory of one training process on `device` ("cuda" or "cpu") for the base in
    `model_dir`. `tokens_per_micro_batch` counts every position of one micro batch (padding
    included); `weight_bytes` is the loaded base's dtype size (models.load.pick_dtype), and
    `compute_bytes` 2 under bf16/fp16 (autocast) and 4 under fp32. `labelled_tokens`: the most
    labelled positions in one micro batch under the labelled loss (None: the full loss, logits at
    every position)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    shapes = weight_shapes(model_dir)
    parameters = sum(math.prod(s) for s in shapes.values())
    layers = int(config["num_hidden_layers"])
    h = int(config["hidden_size"])
    inter = int(config.get("intermediate_size") or 4 * h)
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or h // heads)
    q = heads * head_dim
    vocab = int(config["vocab_size"])

    linear: dict[str, tuple[int, ...]] = {k: s for k, s in shapes.items()
                                          if len(s) == 2 and ".layers." in k and k.endswith(".weight")}
    linear_params = sum(math.prod(s) for s in linear.values())
    targets = _targets(linear, lora_targets) if method != "full" else {}
    if method == "full":
        # Every weight trained in its own dtype: the weight, its gradient and AdamW's two moments.
        weights, trainable_params = weight_bytes * parameters, parameters
        trainable = 3 * weight_bytes * parameters
    else:
        # QLoRA's linear layers are NF4; its other weights (embeddings, head, norms) are made fp32
        # by prepare_model_for_kbit_training. The adapter is fp32: weight, gradient, two moments.
        linear_bytes, other_bytes = (NF4_BYTES, 4) if method == "qlora" else (weight_bytes, weight_bytes)
        weights = int(linear_bytes * linear_params + other_bytes * (parameters - linear_params))
        trainable_params = sum(lora_rank * (s[0] + s[1]) for s in targets.values())
        trainable = 16 * trainable_params

    per_token = _saved_per_token(h, q, inter, compute_bytes,
                                 lora_inputs=sum(int(s[1]) for s in targets.values()) // layers,
                                 lora_dropout=lora_dropout if method != "full" else 0.0, cuda=device.startswith("cuda"))
    if gradient_checkpointing:  # each layer's input, and one layer's own at a time
        activations = tokens_per_micro_batch * (layers * compute_bytes * h + per_token)
    else:
        activations = tokens_per_micro_batch * layers * per_token
    activations += compute_bytes * tokens_per_micro_batch * h * 2  # embeddings out, final norm
    rows = tokens_per_micro_batch if labelled_tokens is None else min(labelled_tokens, LOSS_CHUNK_ROWS)
    # The head's output, its fp32 copy's log-softmax (kept for backward), and in backward that
    # log-softmax's gradient, the logits' fp32 gradient and its cast back: 12 bytes and one more copy.
    logits = (12 + compute_bytes) * rows * vocab
    overhead = OVERHEAD_CUDA if device.startswith("cuda") else OVERHEAD_CPU
    return Estimate(int(weights), int(trainable), int(activations), int(logits), overhead, parameters,
                    trainable_params)


def _saved_per_token(h: int, q: int, inter: int, compute_bytes: int, *, lora_inputs: int, lora_dropout: float,
                     cuda: bool) -> int:
    """Bytes autograd keeps per token for one decoder layer (its backward's inputs):

    - each RMSNorm its fp32 input (transformers' LlamaRMSNorm computes in fp32) and its output,
      which the next projections keep;
    - attention: the rotated queries, the keys and values repeated to every query head (grouped
      query attention under sdpa), the output, and o_proj's input;
    - the MLP: gate's output (SiLU's input), SiLU's output, up's output and their product;
    - LoRA: for each adapted module's input (`lora_inputs` features) dropout's mask (a bool on a
      GPU; on a CPU models/dropout.py's mask in the adapter's fp32) and the copy the adapter's
      first matrix keeps (peft casts the input to the adapter's fp32; autocast to the compute
      dtype)."""
    cb = compute_bytes
    norms = 2 * (4 * h + cb * h)
    attention = cb * 5 * q
    mlp = cb * 4 * inter
    mask = (1 if cuda else 4) if lora_dropout > 0 else 0
    lora = lora_inputs * (mask + (cb if cb < 4 or lora_dropout > 0 else 0))
    return norms + attention + mlp + lora


def _targets(linear: dict[str, tuple[int, ...]], lora_targets: str) -> dict[str, tuple[int, ...]]:
    if lora_targets.strip() == "all-linear":
        return linear
    names = {t.strip() for t in lora_targets.split(",") if t.strip()}
    return {k: s for k, s in linear.items() if k.rsplit(".", 2)[-2] in names}


@dataclass(frozen=True)
class Devices:
    """Where a training runs: the kind of device ("cuda" or "cpu"), the memory one of them gives a
    training, in words, how many processes train together there (FSDP shards over them), and what
    `precision auto` resolves to there for an unquantized base ("bf16" or "fp32"). A worker
    registers its own (store.models.WorkerPresence) so that a server without those devices can
    check a training against them."""

    kind: str
    memory: int
    description: str
    processes: int = 1
    precision: str = "fp32"

    def key(self) -> str:
        """What an estimate depends on besides the training: equal keys, equal estimates."""
        return f"{self.kind}/{self.processes}/{self.precision}"


def local_devices(device: str, processes: int | None = None) -> Devices:
    """This machine's `device` ("cuda[:i]" or "cpu"): the smallest visible GPU's total memory, or
    the memory the operating system reports available; `processes` defaults to this process's
    world size (models.load.world_size)."""
    from tunery.models.load import world_size
    from tunery.models.precision import resolve_precision

    precision = resolve_precision("auto", device).name
    processes = processes or world_size()
    if device.startswith("cuda"):
        import torch

        sizes = [(torch.cuda.get_device_properties(i).total_memory, torch.cuda.get_device_name(i))
                 for i in range(torch.cuda.device_count())]
        size, name = min(sizes)
        return Devices("cuda", size, f"{name} ({gib(size)})", processes, precision)
    available = available_memory()
    return Devices("cpu", available, f"this machine's available memory ({gib(available)})", processes, precision)


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def will_not_fit(estimate: Estimate, capacity: int, where: str, inputs) -> str | None:
    """None when the estimate fits `capacity`; else the one-line reason, with the inputs to change
    (errors.memory_remedies, as an out-of-memory failure names them)."""
    from tunery.errors import memory_remedies

    if estimate.total <= capacity:
        return None
    return (f"this training would need {estimate.describe()} per device, more than {where}: "
            "try " + "; or ".join(memory_remedies(inputs)))


def check_training(inputs: Any, model_dir: str | Path, sequences: list, devices: Devices,
                   where: str | None = None) -> tuple[Estimate, str | None]:
    """A training's estimate for its longest micro batch of `sequences` (anything with `input_ids`
    and `labels` as the trainer gets them; DPO's micro batch holds each pair's two) on `devices`:
    (the estimate, None when it fits or else the one-line reason with the inputs to change, naming
    the devices as `where` does, by default their description). `inputs` is a spec.TrainingInputs.
    Nothing is loaded."""
    from tunery.data import IGNORE_INDEX

    dpo = inputs.method == "dpo"
    per_step = inputs.micro_batch_size * (2 if dpo else 1)
    rows = min(per_step, len(sequences))
    longest = max((len(s.input_ids) for s in sequences), default=0)
    labelled = max((sum(label != IGNORE_INDEX for label in s.labels) for s in sequences), default=0)
    quantized, full = inputs.peft_method == "qlora", inputs.peft_method == "full"
    cuda = devices.kind.startswith("cuda")
    # As models.load.pick_dtype and models.precision.resolve_precision choose there.
    if inputs.precision != "auto":
        precision = inputs.precision
    else:
        precision = "fp32" if quantized and not cuda else devices.precision
    compute = 4 if precision == "fp32" else 2
    weight_bytes = 4 if precision == "fp32" or (inputs.precision == "auto" and full and not cuda) else 2
    # TRL's DPO computes logits at every position; our SFT loss only where there are labels.
    labelled_only = inputs.loss_computation == "labelled" and not dpo
    estimate = estimate_training(
        model_dir, method=inputs.peft_method, tokens_per_micro_batch=rows * longest,
        gradient_checkpointing=inputs.gradient_checkpointing, weight_bytes=weight_bytes, compute_bytes=compute,
        lora_rank=inputs.lora_rank, lora_targets=inputs.lora_target_modules, lora_dropout=inputs.lora_dropout,
        labelled_tokens=rows * labelled if labelled_only else None, device=devices.kind)
    world = devices.processes
    if inputs.fsdp and world > 1:  # FSDP shards the weights, gradients and optimizer state
        estimate = dataclasses.replace(estimate, weights=estimate.weights // world,
                                       trainable=estimate.trainable // world)
    return estimate, will_not_fit(estimate, devices.memory, where or devices.description, inputs)


def summary(estimate: Estimate) -> dict[str, Any]:
    """The estimate as reports and events carry it (bytes, and the part sizes)."""
    return {**estimate.parts(), "parameters": estimate.parameters, "trainable_parameters": estimate.trainable_parameters}
