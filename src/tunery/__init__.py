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
