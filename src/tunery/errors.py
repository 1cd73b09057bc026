"""Errors a user can act on. Each one's message names what was wrong and where."""

from __future__ import annotations

from dataclasses import dataclass


class TuneryError(Exception):
    """Base for every error tunery reports to a user (CLI exit code 2, HTTP 4xx)."""


class SpecError(TuneryError):
    """A training input is invalid (unknown key, wrong type, out of range, inconsistent)."""


class OutOfMemoryError(TuneryError):
    """Training ran out of (GPU or host) memory; the message says what to change."""


def out_of_memory_message(exc: BaseException, inputs) -> str:
    """What ran out, how big the largest batch was, and the inputs that shrink it, best first."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return (f"out of memory during training: {first}. Each step holds micro_batch_size ({inputs.micro_batch_size}) "
            f"sequences of up to {inputs.max_length} tokens. Try " + "; or ".join(memory_remedies(inputs)) + ".")


def memory_remedies(inputs) -> list[str]:
    """The training inputs that make a training need less memory, best first."""
    m, t = inputs.micro_batch_size, inputs.train_batch_size
    tries = []
    if m > 1:
        tries.append(f"micro_batch_size {m // 2} (train_batch_size stays {t}: the rest is gradient accumulation)")
    if not inputs.gradient_checkpointing:
        tries.append("gradient_checkpointing true (recomputes activations: less memory, ~30% slower)")
    if inputs.peft_method == "lora":
        tries.append("peft_method qlora (the base in 4-bit)")
    elif inputs.peft_method == "full":
        tries.append("peft_method lora or qlora (no optimizer state for the base weights)")
    tries.append(f"a smaller max_seq_length (now {inputs.max_length} tokens per sequence)")
    return tries


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), Python's MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))


class ModelNotFoundError(TuneryError):
    """A base model could not be resolved; the message lists everything that was tried."""


@dataclass(frozen=True)
class LineError:
    """One problem in one line of a JSONL file."""

    path: str
    line: int
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}"
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"

    def as_dict(self) -> dict:
        return {"file": self.path, "line": self.line, "field": self.field, "reason": self.reason}


class DataError(TuneryError):
    """A data file failed validation. Holds every line error found (the message shows the first 20)."""

    SHOWN = 20

    def __init__(self, errors: list[LineError], summary: str | None = None):
        self.errors = list(errors)
        self.summary = summary
        super().__init__(self._render())

    def _render(self) -> str:
        lines = []
        if self.summary:
            lines.append(self.summary)
        lines += [str(e) for e in self.errors[: self.SHOWN]]
        if len(self.errors) > self.SHOWN:
            lines.append(f"... and {len(self.errors) - self.SHOWN} more bad lines")
        return "\n".join(lines)
