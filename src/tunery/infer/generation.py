"""The serving engines' one interface: submit a request, read its text stream, cancel it, read its metrics.

An engine serves one base model, bare or with any of its LoRA adapters, and full fine-tunes of
it. `submit(Request)` returns a `Generation` at once (or raises `EngineBusy` when its queue is
full); iterating the generation yields text pieces as they are produced, cut before the first stop
sequence; `cancel()` ends it within a decoding step; when iteration ends `metrics` holds time to
first token, token counts, tokens/s, the seed and the stop reason.

Engines, each one module of this shape:
- `infer.embedded.EmbeddedEngine`: transformers in this process, continuous batching (the default);
- `infer.vllm.VLLMEngine`: a vLLM OpenAI-compatible server (GPUs, clusters).

Each imports this module and nothing imports them but `infer.engines.engine_for(base)`, which
builds the configured one. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import math
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tunery.errors import TuneryError
from tunery.infer.stops import parse_stop_sequences
from tunery.infer.weights import Weights, resolve_weights
from tunery.settings import Settings

GREEDY_BELOW = 1e-5  # Replicate treats a temperature this small as "no sampling"


class EngineBusy(TuneryError):
    """The engine's queue is full: try again later (HTTP 429)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class SamplingParams:
    """How to generate, with Replicate's input names and defaults.

    `stop_sequences` is a comma-separated string (or a list, to allow commas inside a stop).
    A temperature of 0 (or at most 1e-5) means greedy decoding; top_p and top_k then do nothing.
    top_k=0 disables top-k filtering. `min_new_tokens` keeps end-of-sequence from being sampled
    until that many tokens are out (Replicate's Llama input; vLLM's `min_tokens`; -1 or 0: off);
    stop sequences still apply. `seed` makes sampling repeatable; None picks a fresh one,
    reported in the metrics. Construction raises ValueError naming the first out-of-range field.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.75
    top_p: float = 0.9
    top_k: int = 50
    stop_sequences: str | list[str] | None = None
    seed: int | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range (fields can be reassigned
        after construction, so engines check again on submit)."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_int(self.min_new_tokens) or not -1 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be an integer from -1 (off) to max_new_tokens "
                             f"({self.max_new_tokens}), got {self.min_new_tokens!r}")
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


@dataclass
class Request:
    """What to generate: a prompt (text, tokenized as training tokenized prompts, or token ids),
    how, on which weights (None: the bare base), and for whom (`owner`: the engines start waiting
    requests fairly between owners, `fair_index`; None is one owner like any other)."""

    prompt: str | list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    weights: Weights | None = None
    owner: str | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, (str, list)):
            raise TypeError(f"prompt must be a string, got {type(self.prompt).__name__}")
        self.params.validate()
        if self.params.seed is None:
            self.params.seed = int.from_bytes(os.urandom(4), "little")

    @classmethod
    def make(cls, prompt: str | list[int], *, weights: str | Path | Weights | None = None,
             params: SamplingParams | None = None, settings: Settings | None = None,
             owner: str | None = None) -> Request:
        """A request with `weights` resolved now (a run in storage fetched through `settings`'
        storage options), so a bad path raises TuneryError here."""
        if weights is not None and not isinstance(weights, Weights):
            weights = resolve_weights(weights, settings)
        return cls(prompt, params or SamplingParams(), weights, owner)


def fair_index(owners: Sequence[str | None], running: Mapping[str | None, int],
               served: Mapping[str | None, int]) -> int:
    """Which waiting request starts next, given the owners of those waiting (oldest first), how
    many requests each owner has running, and when each owner last had one started (a count that
    grows; absent: never): the oldest request of the owner with the fewest running, and between
    owners with as many, of the one served longest ago (round robin). A flood from one owner then
    delays another owner's request by one slot at most: it starts in the first slot that frees."""
    return min(range(len(owners)), key=lambda i: (running.get(owners[i], 0), served.get(owners[i], -1), i))


class Served(dict):
    """When each owner last had a request started: `mark(owner)` on each start; the oldest
    entries go beyond `keep` owners (an owner not seen for that long counts as never served)."""

    def __init__(self, keep: int = 4096):
        super().__init__()
        self.keep = keep
        self.turn = 0

    def mark(self, owner: str | None) -> None:
        self.turn += 1
        self.pop(owner, None)
        self[owner] = self.turn  # re-inserted: the dict stays in serving order
        while len(self) > self.keep:
            del self[next(iter(self))]


_DONE = object()


class Generation:
    """One submitted request. Iterate it for the text (non-empty pieces whose concatenation is the
    generated text cut before the first stop sequence). It ends at eos,
    max_new_tokens, a stop sequence, or within a step of `cancel()` (nothing more is yielded once
    cancelled). Closing the iterator early cancels the request. An engine error is raised from the
    iteration. `metrics` is final once iteration ends: predict_time and time_to_first_token
    (seconds since submit, queueing included), input_token_count, output_token_count (tokens the
    model produced, eos included), tokens_per_second (output tokens over the time since the
    request started generating), seed, stop_reason (eos | stop_sequence | max_new_tokens |
    cancelled | error). Iterating again after the end yields the same pieces.
    """

    def __init__(self, request: Request):
        self.request = request
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.token_ids: list[int] = []  # the tokens produced, eos included (embedded; vLLM for a prompt of ids)
        self.stop_reason: str | None = None
        self.error: BaseException | None = None
        self.metrics: dict[str, Any] = {}
        self._cancel = threading.Event()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._finished = threading.Event()
        self._pieces: list[str] | None = None  # what the first iteration yielded, once it ended
        self._wake: Callable[[], Any] | None = None  # an async iteration's wake-up, called from the engine

    # -- the caller's side
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def __iter__(self) -> Iterator[str]:
        if self._pieces is not None:  # iterated before, to the end: the same pieces again
            yield from self._pieces
            return
        pieces: list[str] = []
        try:
            while (item := self._queue.get()) is not _DONE:
                if not self._cancel.is_set():
                    pieces.append(item)
                    yield item
            self._pieces = pieces
        finally:
            if not self._finished.is_set():
                self._cancel.set()  # closed early: the engine drops the request at its next step
        if self.error is not None:
            raise self.error

    def text(self) -> str:
        return "".join(self)

    async def __aiter__(self) -> AsyncIterator[str]:
        """The same pieces for a coroutine: the engine's thread wakes the event loop when a piece
        or the end is ready, so waiting holds no thread (an API answering many requests at once
        keeps its threads for the requests that need one)."""
        if self._pieces is not None:
            for piece in self._pieces:
                yield piece
            return
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:  # on the engine's thread
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the event loop has closed: nobody is waiting any more
                pass

        self._wake = wake
        pieces: list[str] = []
        try:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    await ready.wait()
                    ready.clear()  # anything queued before this runs is drained by get_nowait
                    continue
                if item is _DONE:
                    break
                if not self._cancel.is_set():
                    pieces.append(item)
                    yield item
            self._pieces = pieces
        finally:
            self._wake = None
            if not self._finished.is_set():
                self._cancel.set()
        if self.error is not None:
            raise self.error

    async def atext(self) -> str:
        return "".join([piece async for piece in self])

    # -- the engine's side
    def started(self, input_tokens: int) -> None:
        self.started_at = time.perf_counter()
        self.input_tokens = input_tokens

    def emit(self, text: str, tokens: int = 0) -> None:
        """`tokens` new tokens were produced, releasing `text` (possibly "")."""
        if tokens:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.output_tokens += tokens
        if text:
            self._queue.put(text)
            if (wake := self._wake) is not None:
                wake()

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._finished.is_set():
            return
        self.finished_at = time.perf_counter()
        self.error = error
        self.stop_reason = "error" if error is not None else "cancelled" if self._cancel.is_set() else reason
        generating = self.finished_at - (self.started_at or self.finished_at)
        self.metrics = {
            "predict_time": self.finished_at - self.submitted_at,
            "time_to_first_token": self.first_token_at - self.submitted_at if self.first_token_at else None,
            "input_token_count": self.input_tokens,
            "output_token_count": self.output_tokens,
            "tokens_per_second": self.output_tokens / generating if generating > 0 else 0.0,
            "seed": self.request.params.seed,
            "stop_reason": self.stop_reason,
        }
        self._finished.set()
        self._queue.put(_DONE)
        if (wake := self._wake) is not None:
            wake()


class Engine(Protocol):
    """What every engine offers (see the module docstring)."""

    base: str
    max_batch: int
    max_queue: int

    def submit(self, request: Request, *, block: bool = False) -> Generation:
        """Queue `request`; raises EngineBusy when `max_queue` requests already wait (with
        block=True, waits for room instead)."""
        ...

    def load(self) -> dict[str, int]:
        """{"running": n, "waiting": m}."""
        ...

    def close(self) -> None:
        """Stop: running and waiting requests end ("cancelled"); the models are released."""
        ...


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
