"""Inference: run a base model, a LoRA adapter on it, or a full fine-tune, and stream the text.

The public API is `tunery.infer.predict` (Predictor, SamplingParams, predict, resolve_weights,
StopCutter). It is deliberately not re-exported here: a package attribute named `predict` would
shadow the `predict` module. Importing this package does not import torch.
"""
