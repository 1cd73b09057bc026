"""tunery: fine-tune Llama-family models on a JSONL file and serve the tuned versions.

The plain-function API (`tunery.train`, `tunery.predict`) is what the CLI, the worker and a
notebook all call. Heavy imports (torch, transformers) happen on first use, not on import.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "train", "predict", "TrainingInputs"]


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
