"""Predictions: which version a request names, its sampling parameters (typed once, with the
engine's defaults), and room on the serving engines. Replicate's predictions, OpenAI's
completions and Azure's scoring all run through here onto the one `PredictionRunner`."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tunery.service.errors import Busy, Invalid, NotFound
from tunery.service.prediction_runner import Channel, PredictionRunner, sampling_from_input
from tunery.settings import Settings
from tunery.store.models import Model, Prediction, Version
from tunery.store.store import Store

if TYPE_CHECKING:
    from tunery.infer.generation import Generation, SamplingParams

_TOKENIZERS: dict[str, Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def find_version(store: Store, owner: str, ref: str | None) -> tuple[Model, Version]:
    """The (model, version) that `ref` names ("<id>", "owner/name:<id>", or "owner/name" for the
    latest version), if the caller may run it; Invalid otherwise."""
    if not ref:
        raise Invalid("version: required ('<id>' or 'owner/name:<id>')", field="version",
                      errors=[{"field": "version", "reason": "required"}])
    if ":" in ref:
        name, _, version_id = ref.rpartition(":")
    else:
        name, version_id = (ref, "") if "/" in ref else ("", ref)
    found: tuple[Model, Version] | None = None
    if name:
        model_owner, _, model_name = name.partition("/")
        model = store.get_model(owner, model_owner, model_name)
        version = None
        if model is not None:
            version = store.get_version(model.id, version_id) if version_id else store.latest_version(model.id)
        found = (model, version) if model is not None and version is not None else None
    else:
        found = store.find_version(owner, version_id)
    if found is None:
        raise Invalid(f"version {ref!r} does not exist or is not yours to run", field="version",
                      title="Invalid version", errors=[{"field": "version", "reason": "not found"}])
    return found


def latest_version(store: Store, model: Model) -> Version:
    """The model's newest version; NotFound when it has none yet."""
    version = store.latest_version(model.id)
    if version is None:
        raise NotFound(f"model {model.owner}/{model.name} has no version yet: train it first", field="version")
    return version


def model_version(store: Store, model: Model, version_id: str) -> Version:
    version = store.get_version(model.id, version_id)
    if version is None:
        raise NotFound(f"version {model.owner}/{model.name}:{version_id} not found", field="version")
    return version


def create_prediction(store: Store, runner: PredictionRunner, *, owner: str, model: Model, version: Version,
                      input: dict[str, Any], stream: bool = False, webhook: str | None = None,
                      webhook_events_filter: Sequence[str] | None = None) -> tuple[Prediction, Channel]:
    """Check the input, take room on the engine (Busy when there is none, or `owner` holds as many
    as their limit allows), record the prediction and start it; (its row, its channel)."""
    try:
        prompt, params = sampling_from_input(input)
    except (TypeError, ValueError) as exc:
        raise Invalid(f"input: {exc}", field="input", errors=[{"field": "input", "reason": str(exc)}]) from None
    refused = runner.reserve(owner)
    if refused is not None:
        raise refused
    try:
        row = store.create_prediction(owner, model=f"{model.owner}/{model.name}", version_id=version.id, input=input,
                                      stream=stream, webhook=webhook, webhook_events_filter=webhook_events_filter,
                                      runner=runner.runner_id, lease_seconds=runner.lease_seconds)
    except BaseException:
        runner.unreserve(owner)
        raise
    channel = runner.submit(row.id, base=version.base_name, weights=version.run_url, prompt=prompt, params=params,
                            owner=owner, reserved=True)
    return row, channel


class Slot:
    """Room for one generation of `owner` on the serving engines, held until `release()` (idempotent)."""

    def __init__(self, runner: PredictionRunner, owner: str | None):
        self._runner = runner
        self.owner = owner
        self._held = True
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._runner.unreserve(self.owner)


def take_slots(runner: PredictionRunner, owner: str | None, count: int = 1) -> list[Slot]:
    """`count` slots at once for `owner`, or Busy (and none held)."""
    slots: list[Slot] = []
    for _ in range(count):
        refused = runner.reserve(owner)
        if refused is not None:
            for slot in slots:
                slot.release()
            raise refused
        slots.append(Slot(runner, owner))
    return slots


def generate(runner: PredictionRunner, settings: Settings, version: Version, prompt: str,
             params: SamplingParams, owner: str | None = None) -> Generation:
    """Submit one generation of `owner` (no prediction row: OpenAI's completions, Azure's scoring)
    to its base's engine; the caller holds a Slot for it. Busy when the engine's queue is full,
    Invalid for a request the engine refuses (a bad adapter, a prompt too long)."""
    from tunery.errors import TuneryError
    from tunery.infer.generation import EngineBusy, Request

    try:
        request = Request.make(prompt, weights=version.run_url, params=params, settings=settings, owner=owner)
        return runner.engine(version.base_name).submit(request)
    except EngineBusy as exc:
        raise Busy(str(exc)) from None
    except (TuneryError, ValueError) as exc:
        raise Invalid(str(exc)) from None


def tokenizer_for(settings: Settings, version: Version) -> Any:
    """The tokenizer a version was trained with (its run's), or its base's; kept once loaded."""
    key = version.run_url or f"base:{version.base_name}"
    found = _TOKENIZERS.get(key)
    if found is not None:
        return found
    # One load at a time: requests arriving together at a fresh server would otherwise import
    # transformers on several threads at once, which fails (its lazy module is half made).
    with _TOKENIZERS_LOCK:
        found = _TOKENIZERS.get(key)
        if found is None:
            found = _TOKENIZERS[key] = _load_tokenizer(settings, version)
    return found


def forget_tokenizer(version: Version) -> None:
    """Drop the tokenizer kept for a version (it was deleted)."""
    with _TOKENIZERS_LOCK:
        _TOKENIZERS.pop(version.run_url or f"base:{version.base_name}", None)


def _load_tokenizer(settings: Settings, version: Version) -> Any:
    from tunery.infer.embedded import load_tokenizer_dir
    from tunery.infer.weights import resolve_weights
    from tunery.models.load import load_tokenizer
    from tunery.models.resolve import resolve_base

    weights = resolve_weights(version.run_url, settings) if version.run_url else None
    if weights is not None and weights.tokenizer is not None:
        tokenizer = load_tokenizer_dir(weights.tokenizer, weights.source)
    else:
        tokenizer = load_tokenizer(resolve_base((weights.base if weights else None) or version.base_name, settings))
    return tokenizer
