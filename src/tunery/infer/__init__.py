"""Inference: run a base model, a LoRA adapter on it, or a full fine-tune, and stream the text.

The public API lives in `tunery.infer.predict`; it is re-exported here. Importing this package
does not import torch (that happens on the first prediction).
"""

from tunery.infer.predict import (
    Predictor,
    SamplingParams,
    StopCutter,
    Weights,
    parse_stop_sequences,
    predict,
    resolve_weights,
)

__all__ = [
    "Predictor",
    "SamplingParams",
    "StopCutter",
    "Weights",
    "parse_stop_sequences",
    "predict",
    "resolve_weights",
]
