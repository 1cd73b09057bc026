"""Predictions for the CLI and notebooks: one call, one text, on the configured serving engine.

A prompt is used verbatim, as Replicate does: it is tokenized exactly as training tokenized
prompts (`add_special_tokens=True`, no chat template), so a fine-tuned model sees at inference
what it saw in training. The engines themselves (`infer.embedded`, `infer.vllm`, on the interface in
`infer.generation`) serve many requests at once; the HTTP service submits to them directly.
"""

from __future__ import annotations

import threading
from pathlib import Path

from tunery.errors import TuneryError
from tunery.infer.engines import engine_for
from tunery.infer.generation import Engine, Request, SamplingParams
from tunery.infer.weights import Weights, resolve_weights
from tunery.models.registry import DEFAULT_BASE

__all__ = ["base_for", "predict", "stream"]

_LAST: Engine | None = None
_LAST_LOCK = threading.Lock()


def base_for(weights: Weights | None, base: str | None = None) -> str:
    """The base to serve `weights` on: `base` if given, else the one they were trained on
    (manifest or adapter config), else the default base."""
    if base:
        return base
    if weights is not None and weights.kind == "adapter" and not weights.base:
        raise TuneryError(f"weights {weights.source!r} do not record their base model; pass a base")
    return (weights.base if weights is not None else None) or DEFAULT_BASE


def _engine(base: str) -> Engine:
    """The last engine, kept so repeated calls with the same base (a notebook) reuse the loaded
    model; a different base replaces it. Engines load lazily, on their first request."""
    global _LAST
    with _LAST_LOCK:
        if _LAST is None or _LAST.base != base:
            if _LAST is not None:
                _LAST.close()
            _LAST = engine_for(base, max_batch=1, max_queue=1)
        return _LAST


def stream(prompt: str, *, base: str | None = None, weights: str | Path | Weights | None = None,
           params: SamplingParams | None = None):
    """A Generation for `prompt` (iterate it for text pieces; `.metrics` after). `weights` is a
    run directory, its archive or an adapter directory; bad weights raise TuneryError now."""
    resolved = resolve_weights(weights) if weights is not None and not isinstance(weights, Weights) else weights
    # A full fine-tune needs no base: the engine loads one only if a request uses it.
    engine = _engine(base_for(resolved, base))
    return engine.submit(Request(prompt, params or SamplingParams(), resolved), block=True)


def predict(prompt: str, *, base: str | None = None, weights: str | Path | None = None, **sampling) -> str:
    """One-shot prediction; `sampling` takes SamplingParams' fields."""
    return stream(prompt, base=base, weights=weights, params=SamplingParams(**sampling)).text()
