"""tunery: fine-tune Llama-family models on a JSONL file and serve the tuned versions.

The plain-function API (`tunery.train`, `tunery.predict`) is what the CLI, the worker and a
notebook all call. Heavy imports (torch, transformers) happen on first use, not on import.
"""

from __future__ import annotations

import logging

from tunery.version import __version__

__all__ = ["__version__", "train", "predict", "TrainingInputs"]


class _NoKernelHubNotice(logging.Filter):
    """bitsandbytes, when imported on a CPU with avx512_bf16 (peft imports it for every LoRA run),
    tries to download a 4-bit GEMM kernel from a model hub through the `kernels` package, which
    logs a notice when it cannot (offline: "Skipping publisher trust check for
    'kernels-community/quantization-bitsandbytes'"; no hub: "Failed to load CPU
    gemm_4bit_forward"). Nothing tunery runs needs that kernel (QLoRA on a CPU computes in fp32,
    where bitsandbytes' own kernels serve), so those notices are dropped rather than printed on
    every start; any other kernel's notices pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "gemm_4bit_forward" not in message and "quantization-bitsandbytes" not in message


for _logger in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_logger).addFilter(_NoKernelHubNotice())


def freeze_at_exit() -> None:
    """Make this process's exit skip the interpreter's final garbage collection over the objects
    alive then (`gc.freeze`, registered now, runs after the exit handlers registered later). With
    torch, transformers and peft loaded that collection took 1.3 s of a command's 1.8 s exit, and
    a worker waits for its training's child process to end; nothing it would free matters once
    the process ends (open files are flushed and closed regardless). For the entry points only:
    the CLI and the worker's child process."""
    import atexit
    import gc

    atexit.register(gc.freeze)


def __getattr__(name: str):
    if name == "train":
        from tunery.train.recipe import train

        return train
    if name == "predict":
        from tunery.infer.predict import predict

        return predict
    if name == "TrainingInputs":
        from tunery.spec import TrainingInputs

        return TrainingInputs
    raise AttributeError(name)
