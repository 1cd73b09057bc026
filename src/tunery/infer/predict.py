"""Predictions: one base model kept loaded, LoRA adapters switched per request, text streamed.

The CLI (`tunery predict`) and the HTTP service call this module. A prompt is used verbatim, as
Replicate does: it is tokenized exactly as training tokenized prompts (`add_special_tokens=True`,
no chat template), so a fine-tuned model sees at inference what it saw in training.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunery.errors import TuneryError
from tunery.infer.stops import StopCutter, parse_stop_sequences
from tunery.infer.weights import Weights, resolve_weights
from tunery.models.registry import DEFAULT_BASE

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from tunery.models.resolve import ResolvedBase

__all__ = [
    "Predictor",
    "SamplingParams",
    "StopCutter",
    "Weights",
    "parse_stop_sequences",
    "predict",
    "resolve_weights",
]

GREEDY_BELOW = 1e-5  # Replicate treats a temperature this small as "no sampling"


@dataclass
class SamplingParams:
    """How to generate, with Replicate's input names and defaults.

    `stop_sequences` is a comma-separated string (or a list, to allow commas inside a stop).
    A temperature of 0 (or at most 1e-5) means greedy decoding; top_p and top_k then do nothing.
    top_k=0 disables top-k filtering. `seed` makes sampling repeatable; None picks a fresh one,
    reported in the metrics. Construction raises ValueError naming the first out-of-range field.
    """

    max_new_tokens: int = 128
    temperature: float = 0.75
    top_p: float = 0.9
    top_k: int = 50
    stop_sequences: str | list[str] | None = None
    seed: int | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range (fields can be reassigned
        after construction, so `Predictor.stream` checks again)."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        parse_stop_sequences(self.stop_sequences)  # raises ValueError for a malformed value

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_BELOW

    @property
    def stops(self) -> list[str]:
        return parse_stop_sequences(self.stop_sequences)

    def generate_kwargs(self) -> dict[str, Any]:
        """Arguments for `model.generate`. Unused knobs are set to None explicitly so values in a
        model's generation_config.json (e.g. temperature 0.6) neither apply nor warn."""
        if self.greedy:
            return {
                "max_new_tokens": self.max_new_tokens,
                "do_sample": False,
                "temperature": None,
                "top_p": None,
                "top_k": None,
            }
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": self.top_k,
        }


@dataclass
class _Adapter:
    name: str  # the peft adapter name
    stamp: tuple  # the weight files' (name, size, mtime) when loaded: a change means retrained in place
    tokenizer: Any  # the run's tokenizer, or None for the base's


class Predictor:
    """Serves one base model, bare or with any of its LoRA adapters, plus full fine-tunes.

    The base is loaded once. The first adapter wraps it with `PeftModel.from_pretrained` (which
    injects LoRA layers into the base in place); later ones are added with `load_adapter` and
    chosen per request with `set_adapter`, so switching costs no reload. At most `max_adapters`
    stay loaded, least recently used evicted first (`delete_adapter`). A full fine-tune is a
    separate model; the most recent one stays loaded. One lock covers everything from choosing
    the weights to the end of generation, so concurrent callers are served one at a time.

    With `lazy=True` nothing is resolved or loaded until a request needs the base.
    Counters for callers and tests: `base_loads`, `adapter_loads`, `full_loads`.
    """

    def __init__(
        self,
        base: str,
        *,
        precision: str = "auto",
        device: str | None = None,
        max_adapters: int = 8,
        lazy: bool = False,
    ):
        from tunery.models.load import pick_device

        if not _is_int(max_adapters) or max_adapters < 1:
            raise ValueError(f"max_adapters must be an integer >= 1, got {max_adapters!r}")
        self.base = base
        self.precision = precision
        self.device = device or pick_device()
        self.max_adapters = max_adapters
        self.resolved: ResolvedBase | None = None  # ResolvedBase once the base is resolved
        self.base_model: Any = None
        self.base_tokenizer: Any = None
        self.base_loads = self.adapter_loads = self.full_loads = 0
        self.last_metrics: dict[str, Any] = {}
        self._peft: Any = None  # the PeftModel around base_model, once an adapter was loaded
        self._adapters: OrderedDict[str, _Adapter] = OrderedDict()  # by adapter dir; oldest first
        self._full: dict[str, tuple] = {}  # model dir -> (stamp, model, tokenizer); at most one
        self._lock = threading.Lock()
        if not lazy:
            with self._lock:
                self._ensure_base()

    @property
    def loaded_adapters(self) -> list[str]:
        """Adapter directories currently loaded, least recently used first."""
        return list(self._adapters)

    def stream(
        self,
        prompt: str,
        *,
        weights: str | Path | Weights | None = None,
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
        metrics: dict | None = None,
    ) -> Iterator[str]:
        """Generate a continuation of `prompt`, yielding text pieces as they are produced.

        `weights` (a run directory, its zip archive, an adapter directory, or a resolved
        `Weights`) is resolved now, so a bad path raises TuneryError before anything is yielded;
        None uses the bare base (errors loading the weights surface on the first iteration, which
        is when the model lock is taken). The joined pieces are the text up to, never including, the first
        stop sequence; generation ends there, at eos, after `max_new_tokens`, or within one token
        of `cancel.set()`. The same seed and inputs give the same text.

        When iteration ends (or the iterator is closed), `last_metrics` and `metrics` (if given)
        hold: predict_time and time_to_first_token (seconds since this call's first iteration,
        lock wait and loading included), input_token_count, output_token_count (tokens the model
        produced, eos included), tokens_per_second (output tokens over the time in generate),
        seed, stop_reason ("eos", "stop_sequence", "max_new_tokens", "cancelled", "aborted",
        "error"). Consume or close the iterator: it holds the model lock until it ends.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        params = params or SamplingParams()
        params.validate()
        if weights is not None and not isinstance(weights, Weights):
            weights = resolve_weights(weights)
        return self._stream(prompt, weights, params, cancel, metrics)

    def generate(
        self,
        prompt: str,
        *,
        weights: str | Path | Weights | None = None,
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
        metrics: dict | None = None,
    ) -> str:
        """The whole text `stream` would yield, joined."""
        return "".join(self.stream(prompt, weights=weights, params=params, cancel=cancel, metrics=metrics))

    def _stream(
        self,
        prompt: str,
        weights: Weights | None,
        params: SamplingParams,
        cancel: threading.Event | None,
        metrics: dict | None,
    ) -> Iterator[str]:
        from tunery.infer.stream import GenerationStream

        called = time.perf_counter()
        run = None
        with self._lock:
            try:
                model, tokenizer, context = self._select(weights)
                input_ids = tokenizer(prompt, add_special_tokens=True, return_tensors="pt").input_ids
                if input_ids.shape[1] == 0:
                    raise TuneryError(
                        "prompt is empty and the tokenizer adds no BOS token: nothing to continue"
                    )
                eos = eos_ids(model, tokenizer)
                kwargs = params.generate_kwargs() | {
                    "eos_token_id": sorted(eos) or None,
                    "pad_token_id": pad_id(model, tokenizer, eos),
                }
                seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
                run = GenerationStream(
                    model,
                    tokenizer,
                    input_ids.to(model.device),
                    generate_kwargs=kwargs,
                    stops=params.stops,
                    eos_ids=eos,
                    seed=seed,
                    cancel=cancel,
                    context=context,
                )
                yield from run
            finally:
                if run is not None:
                    self.last_metrics = _metrics(run, called)
                    if metrics is not None:
                        metrics.update(self.last_metrics)

    def _select(self, weights: Weights | None):
        """(model to call generate on, tokenizer, context factory or None) for a request."""
        if weights is not None and weights.kind == "full":
            _, model, tokenizer = self._full_model(weights)
            return model, tokenizer, None
        self._ensure_base()
        if weights is None:
            if self._peft is None:
                return self.base_model, self.base_tokenizer, None
            return self._peft, self.base_tokenizer, self._peft.disable_adapter
        entry = self._adapter(weights)
        return self._peft, entry.tokenizer or self.base_tokenizer, None

    def _ensure_base(self) -> None:
        if self.base_model is not None:
            return
        from tunery.models.load import load_model, load_tokenizer
        from tunery.models.resolve import resolve_base

        self.resolved = self.resolved or resolve_base(self.base)
        self.base_tokenizer = load_tokenizer(self.resolved)
        self.base_model = load_model(self.resolved, precision=self.precision, device=self.device).eval()
        self.base_loads += 1
        from tunery.models.precision import resolve_precision

        chosen = resolve_precision(self.precision, self.device)
        logger.info("predictions on %s run in %s on %s (%s)", self.base, chosen.name, self.device, chosen.reason)

    def _adapter(self, weights: Weights) -> _Adapter:
        """Make `weights` the active adapter, loading it (and evicting the oldest) if needed."""
        key, stamp = str(weights.path), _stamp(weights.path)
        entry = stale = self._adapters.get(key)
        if entry is None or entry.stamp != stamp:
            self._check_base(weights)
            entry = self._adapters[key] = self._load_adapter(weights, key, stamp)
        else:
            stale = None
        self._adapters.move_to_end(key)
        # inference_mode=True keeps the adapter frozen; peft's default makes it trainable.
        self._peft.set_adapter(entry.name, inference_mode=True)
        if stale is not None:  # retrained in place: drop the old copy once the new one is active
            self._peft.delete_adapter(stale.name)
        while len(self._adapters) > self.max_adapters:
            _, old = self._adapters.popitem(last=False)
            self._peft.delete_adapter(old.name)
        return entry

    def _load_adapter(self, weights: Weights, key: str, stamp: tuple) -> _Adapter:
        from peft import PeftModel

        # peft adapter names become nn.ModuleDict keys, which may not contain "."; a hash of the
        # path (and stamp, so a retrained copy can coexist briefly with the stale one) is safe.
        name = "adapter_" + hashlib.sha256(f"{key}|{stamp}".encode()).hexdigest()[:16]
        tokenizer = _load_tokenizer_dir(weights.tokenizer, weights.source) if weights.tokenizer else None
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self.base_model, key, adapter_name=name, is_trainable=False, torch_device=str(self.device)
                )
            else:
                self._peft.load_adapter(
                    key, adapter_name=name, is_trainable=False, torch_device=str(self.device)
                )
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            if self._peft is None:
                # from_pretrained may have injected LoRA layers before failing: reload the base
                # on the next request rather than serve a half-modified model.
                self.base_model = None
            elif name in self._peft.peft_config:
                self._peft.delete_adapter(name)
            raise TuneryError(
                f"weights {weights.source!r}: cannot load the adapter in {key} onto base {self.base!r}: {e}"
            ) from e
        self.adapter_loads += 1
        return _Adapter(name, stamp, tokenizer)

    def _check_base(self, weights: Weights) -> None:
        """Refuse an adapter whose manifest records a different base than the one served."""
        served = self.resolved.sha256 if self.resolved else None
        if weights.base_sha256 and served and weights.base_sha256 != served:
            raise TuneryError(
                f"weights {weights.source!r} were trained on base {weights.base!r} "
                f"(sha256 {weights.base_sha256[:12]}), but this predictor serves {self.base!r} (sha256 {served[:12]})"
            )

    def _full_model(self, weights: Weights) -> tuple:
        from tunery.models.load import load_model
        from tunery.models.resolve import resolve_base

        key, stamp = str(weights.path), _stamp(weights.path)
        cached = self._full.get(key)
        if cached is not None and cached[0] == stamp:
            return cached
        if weights.tokenizer is None:
            raise TuneryError(f"weights {weights.source!r}: no tokenizer saved with the model in {key}")
        self._full.clear()  # keep one full model: free the previous before loading the next
        tokenizer = _load_tokenizer_dir(weights.tokenizer, weights.source)
        model = load_model(resolve_base(key), precision=self.precision, device=self.device).eval()
        self.full_loads += 1
        self._full[key] = (stamp, model, tokenizer)
        return self._full[key]


_LAST: Predictor | None = None
_LAST_LOCK = threading.Lock()


def predict(prompt: str, *, base: str | None = None, weights: str | Path | None = None, **sampling) -> str:
    """One-shot prediction; `sampling` takes SamplingParams' fields.

    The base defaults to the one the weights were trained on (manifest or adapter config), else
    the default base. The last Predictor is kept, so repeated calls with the same base (a
    notebook) reuse the loaded model; a different base replaces it.
    """
    global _LAST
    params = SamplingParams(**sampling)
    resolved = resolve_weights(weights) if weights is not None else None
    if base is None and resolved is not None and resolved.kind == "adapter":
        if not resolved.base:
            raise TuneryError(f"weights {str(weights)!r} do not record their base model; pass base=")
        base = resolved.base
    with _LAST_LOCK:
        # A full fine-tune needs no base, so with base unset any cached predictor will do. The
        # predictor is lazy: it loads on first use, after the one it replaces was released.
        if _LAST is None or (base is not None and _LAST.base != base):
            _LAST = Predictor(
                base or (resolved.base if resolved and resolved.base else DEFAULT_BASE), lazy=True
            )
        predictor = _LAST
    return predictor.generate(prompt, weights=resolved, params=params)


def eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end generation: the model's configured eos plus the tokenizer's. Training
    appends the tokenizer's eos to each completion, and an instruct base's generation config may
    name a different one (e.g. an end-of-turn token), so both must stop."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def pad_id(model, tokenizer, eos: set[int]) -> int | None:
    """A pad id, so generate does not warn about picking one itself."""
    for candidate in (model.generation_config.pad_token_id, tokenizer.pad_token_id):
        if candidate is not None:
            return candidate
    return min(eos) if eos else None


def _load_tokenizer_dir(path: Path, source: str):
    from transformers import AutoTokenizer

    from tunery.models.resolve import quiet_transformers

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise TuneryError(f"weights {source!r}: cannot load the tokenizer in {path}: {e}") from e


def _stamp(folder: Path) -> tuple:
    """Name, size and mtime of the weight files in `folder`: cheap to read, and it changes when
    the weights are rewritten in place."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _metrics(run, called: float) -> dict[str, Any]:
    end = run.finished_at or time.perf_counter()
    in_generate = end - run.started_at if run.started_at else 0.0
    return {
        "predict_time": end - called,
        "time_to_first_token": run.first_token_at - called if run.first_token_at else None,
        "input_token_count": run.prompt_len,
        "output_token_count": run.tokens,
        "tokens_per_second": run.tokens / in_generate if in_generate > 0 else 0.0,
        "seed": run.seed,
        "stop_reason": run.stop_reason,
    }


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
