"""Run `model.generate` in a worker thread and stream its text, cut at stop sequences.

Why not transformers' `TextIteratorStreamer`: it releases text only at word boundaries, and in
transformers 5 the streamer sees each token only *after* the stopping criteria have run for it,
so a stop sequence noticed there would cost one extra forward pass before generation ends. Here
the decoding happens inside a `StoppingCriteria` instead: it is handed every new token before
the step's stop decision, decodes it, feeds the stop cutter, queues the released text, and ends
generation on the very token that completes a stop sequence (or right after `cancel` is set).

Why not transformers' `StopStringCriteria`: it decides when to stop from the vocabulary's token
strings, but the caller still needs the exact cut in the decoded text; matching on the decoded
text itself keeps "when to stop" and "what was shown" the same by construction.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import cast

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tunery.infer.stops import StopCutter

# Prompt tokens decoded along with the first new ones, so that tokenizers which drop a leading
# space at the start of a decode (SentencePiece) still render the first new word's space.
PROMPT_CONTEXT = 5
_DONE = object()


class IncrementalDecoder:
    """Turns token ids, fed a few at a time, into the text they add.

    The text-generation-inference approach: decode a short window ending at the new tokens and
    subtract the decode of the same window without them. The concatenated output equals decoding
    all generated tokens in the prompt's context, at O(1) cost per token, and a token that ends
    in the middle of a UTF-8 character (decoded as U+FFFD) is held until the character completes.
    """

    def __init__(self, tokenizer, context: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.prefix = 0  # start of the decode window
        self.read = len(self.ids)  # ids before this are already turned into text

    def feed(self, ids: list[int]) -> str:
        """Add `ids`; return the text they complete (possibly "")."""
        self.ids.extend(ids)
        return self._advance(final=False)

    def finish(self) -> str:
        """Generation ended: return any text still held (an incomplete character included)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def _decode(self, ids: list[int]) -> str:
        # No clean-up: it rewrites " ." as "." and so would make a piece depend on what follows it.
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class _StreamCriteria(StoppingCriteria):
    """Runs once per generated token inside `generate`: decodes it, queues released text, and
    says stop when a stop sequence completed, `cancel` or `abort` is set."""

    def __init__(self, run: GenerationStream):
        self.run = run
        self.seen = run.prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        run = self.run
        new = input_ids[0, self.seen :].tolist()
        self.seen = input_ids.shape[1]
        if new:
            if run.first_token_at is None:
                run.first_token_at = time.perf_counter()
            run.tokens += len(new)
            run.last_token = new[-1]
            run.emit(run.cutter.feed(run.decoder.feed(new)))
        stop = run.cutter.stopped or run.interrupted()
        flags = torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, flags)  # torch.full is typed as a plain Tensor; dtype=bool makes it one


class GenerationStream:
    """One generation: iterate it to get text pieces while `generate` runs in a worker thread.

    Iteration yields non-empty strings whose concatenation is the generated text cut before the
    first stop sequence. It ends at eos, max_new_tokens, a stop sequence, or soon after `cancel`
    is set (nothing more is yielded once it is). Closing the iterator early (break, or garbage
    collection) aborts the worker and waits for it, so the model is free again on return. An
    exception raised by `generate` is re-raised from the iteration. The counters (`tokens`,
    `first_token_at`, `started_at`, `finished_at`, `stop_reason`) are final once iteration ends.
    """

    def __init__(
        self,
        model,
        tokenizer,
        input_ids: torch.Tensor,
        *,
        generate_kwargs: dict,
        stops: list[str],
        eos_ids: set[int],
        seed: int,
        cancel: threading.Event | None = None,
        context: Callable[[], AbstractContextManager] | None = None,
    ):
        self.model = model
        self.input_ids = input_ids
        self.prompt_len = int(input_ids.shape[1])
        self.generate_kwargs = generate_kwargs
        self.eos_ids = eos_ids
        self.seed = seed
        self.cancel = cancel or threading.Event()
        self.context = context
        self.cutter = StopCutter(stops)
        self.decoder = IncrementalDecoder(tokenizer, input_ids[0, -PROMPT_CONTEXT:].tolist())
        self.tokens = 0
        self.last_token: int | None = None
        self.started_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.stop_reason: str | None = None
        self._abort = threading.Event()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None

    def interrupted(self) -> bool:
        return self.cancel.is_set() or self._abort.is_set()

    def emit(self, text: str) -> None:
        if text:
            self._queue.put(text)

    def __iter__(self) -> Iterator[str]:
        worker = threading.Thread(target=self._work, name="tunery-generate", daemon=True)
        self.started_at = time.perf_counter()
        worker.start()
        try:
            while (item := self._queue.get()) is not _DONE:
                # After cancel the worker stops within a token; drain until it says so but show
                # nothing more, so "cancelled" means no further text reaches the client.
                if not self.cancel.is_set():
                    yield item
        finally:
            self._abort.set()
            worker.join()
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        try:
            # generate() samples with torch's global RNG and takes no generator argument; the
            # caller holds the model lock for the whole run, so no other generation reseeds it.
            torch.manual_seed(self.seed)
            criteria = StoppingCriteriaList([_StreamCriteria(self)])
            with (self.context or nullcontext)():
                self.model.generate(
                    input_ids=self.input_ids,
                    attention_mask=torch.ones_like(self.input_ids),
                    stopping_criteria=criteria,
                    **self.generate_kwargs,
                )
            if not self.interrupted():
                self.emit(self.cutter.feed(self.decoder.finish()) + self.cutter.flush())
        except BaseException as e:  # re-raised in the consuming thread
            self._error = e
        finally:
            self.finished_at = time.perf_counter()
            self.stop_reason = self._reason()
            self._queue.put(_DONE)

    def _reason(self) -> str:
        if self._error is not None:
            return "error"
        if self.cancel.is_set():
            return "cancelled"
        if self.cutter.stopped:
            return "stop_sequence"
        if self._abort.is_set():
            return "aborted"
        if self.last_token in self.eos_ids:
            return "eos"
        return "max_new_tokens"
