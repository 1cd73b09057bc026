"""The embedded engine: transformers in this process, with continuous batching.

One scheduler thread owns the models. Requests wait in a bounded queue; between two decoding
steps the scheduler admits waiting requests (up to `max_batch` running): those of one model are
prefilled together (left-padded), their first tokens sampled, and their key/value caches joined
to the running batch of their model. Every step then decodes one token for every running row in one forward pass; a row that
stops (eos, a stop sequence, max_new_tokens, cancel) leaves the batch at once, and the others go
on. This is the text-generation-inference scheme ("concatenate" and "filter" on left-padded
caches) on transformers' DynamicCache: rows are left-padded to a common cache length, with an
attention mask over the padding and each row's own position ids.

Weights: the base's rows and those of any of its LoRA adapters share one batch — peft's mixed
adapter batches (`adapter_names=` per row, "__base__" for the bare base). At most `max_adapters`
adapters stay loaded, least recently used evicted first (never one a running row uses). A full
fine-tune is a model of its own with its own batch; the most recent one stays loaded, and the
scheduler alternates steps between the batches that have rows.

Sampling is per row, with the row's own temperature, top_k, top_p (applied in that order, as
transformers does) and a generator seeded with the request's seed, so a seed gives the same text
alone or in a batch (up to floating-point differences between batch shapes, which move a
sampled token only when a draw falls within rounding of a boundary). Stop sequences are matched
on the decoded text, per row.

Limits: prompts are prefilled whole before they join (a long prompt delays the running rows'
next token by its prefill time); the cache is contiguous per batch (no paging), so a batch's
memory follows its longest row.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunery.errors import TuneryError
from tunery.infer.generation import EngineBusy, Generation, Request, Served, fair_index
from tunery.infer.lora_batch import BatchedLora, Plan
from tunery.infer.stops import StopCutter
from tunery.infer.stream import PROMPT_CONTEXT, IncrementalDecoder
from tunery.infer.weights import Weights, weights_stamp

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class _Adapter:
    name: str  # the peft adapter name
    stamp: tuple  # the weight files' (name, size, mtime) when loaded: a change means retrained in place
    tokenizer: Any  # the run's tokenizer, or None for the base's


@dataclass
class _Row:
    gen: Generation
    tokenizer: Any
    adapter: str  # peft adapter name, or BASE_ADAPTER
    eos: set[int]
    generator: torch.Generator
    decoder: IncrementalDecoder
    cutter: StopCutter
    length: int  # tokens in this row's cache, prompt included (the next token's position)
    last: int = 0  # the last sampled token, fed at the next step
    produced: int = 0


@dataclass
class _Batch:
    """The running rows of one model, with their joined cache and attention mask."""

    model: Any
    rows: list[_Row] = field(default_factory=list)
    cache: Any = None  # DynamicCache, [rows, heads, length, dim] per layer, left-padded
    mask: torch.Tensor | None = None  # [rows, length], 1 on real tokens


class EmbeddedEngine:
    """See the module docstring. `base` is a base model name, HF id or directory; with `model`
    (and `tokenizer`) given, that loaded model is served as it is (adapters are not switched:
    every request runs on it), e.g. an evaluation's base or base+adapter."""

    def __init__(
        self,
        base: str,
        *,
        precision: str = "auto",
        device: str | None = None,
        max_batch: int = 16,
        max_queue: int = 64,
        max_adapters: int = 8,
        model: Any = None,
        tokenizer: Any = None,
    ):
        from tunery.models.load import pick_device

        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_adapters", max_adapters)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.base = base
        self.precision = precision
        self.device = device or (str(next(model.parameters()).device) if model is not None else pick_device())
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_adapters = max_adapters
        self.resolved: Any = None
        self.base_model: Any = model
        self.base_tokenizer: Any = tokenizer
        self._fixed = model is not None  # serve `model` as given, no adapter switching
        self.base_loads = self.adapter_loads = self.full_loads = 0
        self._peft: Any = None
        self._lora: Any = None  # lora_batch.BatchedLora over _peft
        self._adapters: OrderedDict[str, _Adapter] = OrderedDict()  # by adapter dir; oldest first
        self._full: dict[str, tuple] = {}  # model dir -> (stamp, batch, tokenizer); at most one
        self._base_batch: _Batch | None = None
        self._waiting: deque[Generation] = deque()
        self._served = Served()  # when each owner last had a request admitted (fair share)
        self._unloads: set[str] = set()  # weights folders to unload once no row uses them
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._turn = 0

    # -- the Engine interface
    def submit(self, request: Request, *, block: bool = False) -> Generation:
        return self.submit_many([request], block=block)[0]

    def submit_many(self, requests: list[Request], *, block: bool = False) -> list[Generation]:
        """Queue several requests at once, in order (all before the scheduler sees any: a run of
        them is batched the same way every time, e.g. an evaluation's)."""
        if len(requests) > self.max_queue:
            raise ValueError(f"{len(requests)} requests at once do not fit a queue of {self.max_queue}")
        gens = [Generation(r) for r in requests]
        with self._cond:
            if self._closed:
                raise TuneryError("the engine is closed")
            while len(self._waiting) + len(gens) > self.max_queue:
                if not block:
                    raise EngineBusy(
                        f"{len(self._waiting)} predictions are already waiting for base {self.base!r} "
                        f"(the queue holds {self.max_queue}); try again shortly"
                    )
                self._cond.wait()
                if self._closed:
                    raise TuneryError("the engine is closed")
            self._waiting.extend(gens)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"tunery-engine-{self.base}", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return gens

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"running": self._running(), "waiting": len(self._waiting)}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cond.notify_all()
        for gen in waiting:
            gen.cancel()
            gen.finish("cancelled")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)

    def unload(self, weights: Weights) -> None:
        """Unload `weights` (an adapter or a full model) once no running request uses them (their
        version was deleted); the scheduler does it between two steps."""
        with self._cond:
            if self._thread is None:
                return  # nothing was ever loaded
            self._unloads.add(str(weights.path))
            self._cond.notify_all()

    def _apply_unloads(self) -> None:
        with self._cond:
            pending = set(self._unloads)
        done = set()
        for key in pending:
            entry = self._adapters.get(key)
            if entry is not None:
                if self._in_use(entry.name):
                    continue
                # peft keeps pointing at its last adapter: the last one loaded stays (as LRU
                # eviction keeps it) until another is loaded and evicts it.
                if len(self._adapters) > 1:
                    del self._adapters[key]
                    self._unload(entry.name)
            full = self._full.get(key)
            if full is not None:
                if full[1].rows:
                    continue
                del self._full[key]
            done.add(key)
        with self._cond:
            self._unloads -= done

    @property
    def loaded_adapters(self) -> list[str]:
        """Adapter directories currently loaded, least recently used first."""
        return list(self._adapters)

    # -- the scheduler
    def _batches(self) -> list[_Batch]:
        """The base's batch (once loaded) and each full fine-tune's."""
        found = [self._base_batch] if self._base_batch is not None else []
        return found + [batch for _, batch, _ in self._full.values()]

    def _running(self) -> int:
        return sum(len(b.rows) for b in self._batches())

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and self._running() == 0 and not self._unloads:
                    self._cond.wait()
                if self._closed:
                    break
                admitted: list[Generation] = []
                if self._waiting and self._running() < self.max_batch:
                    running = Counter(row.gen.request.owner for batch in self._batches() for row in batch.rows)
                    while self._waiting and self._running() + len(admitted) < self.max_batch:
                        pick = fair_index([gen.request.owner for gen in self._waiting], running, self._served)
                        gen = self._waiting[pick]
                        del self._waiting[pick]
                        running[gen.request.owner] += 1
                        self._served.mark(gen.request.owner)
                        admitted.append(gen)
                if admitted:
                    self._cond.notify_all()  # room in the queue for blocked submitters
            if admitted:
                self._admit_all(admitted)
            self._step()
            if self._unloads:
                self._apply_unloads()
        for batch in self._batches():
            for row in batch.rows:
                row.gen.cancel()
                row.gen.finish("cancelled")
        self._base_batch = None
        self._full.clear()

    def _step(self) -> None:
        batches = [b for b in self._batches() if b.rows]
        if not batches:
            return
        self._turn = (self._turn + 1) % len(batches)
        batch = batches[self._turn]
        try:
            self._decode(batch)
        except Exception as e:
            logger.exception("decoding step failed")
            for row in batch.rows:
                row.gen.finish("error", e)
            batch.rows, batch.cache, batch.mask = [], None, None

    # -- admitting a request
    def _admit_all(self, gens: list[Generation]) -> None:
        """Prepare each admitted request (weights, tokens), then prefill those of one model together."""
        groups: dict[int, tuple[_Batch, list[tuple[_Row, list[int]]]]] = {}
        for gen in gens:
            if gen.cancelled:
                gen.finish("cancelled")
                continue
            try:
                batch, row, ids = self._prepare(gen)
            except Exception as e:  # a bad adapter, a model that fails to load: this request fails
                logger.warning("prediction failed: %s", e)
                gen.finish("error", e)
                continue
            groups.setdefault(id(batch), (batch, []))[1].append((row, ids))
        for batch, rows in groups.values():
            try:
                self._prefill(batch, rows)
            except Exception as e:
                logger.exception("prefill failed")
                for row, _ in rows:
                    row.gen.finish("error", e)

    def _prepare(self, gen: Generation) -> tuple[_Batch, _Row, list[int]]:
        request = gen.request
        batch, tokenizer, adapter = self._select(request.weights)
        if isinstance(request.prompt, str):
            ids = tokenizer(request.prompt, add_special_tokens=True).input_ids
        else:
            ids = list(request.prompt)
        if not ids:
            raise TuneryError("prompt is empty and the tokenizer adds no BOS token: nothing to continue")
        gen.started(len(ids))
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(request.params.seed or 0))  # Request sets a seed when none was given
        row = _Row(gen=gen, tokenizer=tokenizer, adapter=adapter, eos=eos_ids(batch.model, tokenizer),
                   generator=generator, decoder=IncrementalDecoder(tokenizer, ids[-PROMPT_CONTEXT:]),
                   cutter=StopCutter(request.params.stops), length=len(ids))
        return batch, row, ids

    def _prefill(self, batch: _Batch, rows: list[tuple[_Row, list[int]]]) -> None:
        """One forward over the prompts of `rows`, left-padded to the longest; each row's first
        token is sampled, and the rows that go on join `batch`."""
        from transformers import DynamicCache

        width = max(len(ids) for _, ids in rows)
        input_ids = torch.tensor([[0] * (width - len(ids)) + ids for _, ids in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in rows], device=self.device)
        # Full layers everywhere, sliding-window models included: rows join, leave and are padded on
        # the left by this engine, so every layer keeps each row's whole history and the model's
        # mask applies the window (a sliding layer would drop keys by its own count of the tokens it
        # saw, which joining and filtering rows do not update, and its mask would not match).
        cache = DynamicCache()
        kwargs: dict[str, Any] = {}
        if not bool(mask.all()):
            kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
        with torch.inference_mode(), self._adapters_for(batch, [row.adapter for row, _ in rows]) as extra:
            # Logits at the last position only (rows are left-padded: the same column for all). As
            # an index tensor, not `logits_to_keep=1`: that slice leaves the hidden states strided,
            # and torch's CPU linear then runs the LM head as a batched product over 8 copies of its
            # weight (measured 0.79 s of a 0.87 s prefill of 8 prompts).
            out = batch.model(input_ids=input_ids, cache=cache, use_cache=True,
                              logits_to_keep=torch.tensor([width - 1], device=self.device), **kwargs, **extra)
        keep = []
        for i, token in enumerate(_sample_rows(out.logits[:, -1], [row for row, _ in rows])):
            if not self._advance(rows[i][0], token):  # done after one token: never joins
                keep.append(i)
        if not keep:
            return
        if len(keep) < len(rows):
            mask = _keep_rows(cache, mask, torch.tensor(keep, device=self.device))
        self._join(batch, [rows[i][0] for i in keep], cache, mask)

    def _join(self, batch: _Batch, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        """Add `rows` (their cache and left-padded mask) to `batch`, padding on the left to one length."""
        if batch.cache is None or batch.mask is None or not batch.rows:
            batch.rows, batch.cache, batch.mask = list(rows), cache, mask
            return
        length = max(batch.mask.shape[1], mask.shape[1])
        for old, new in zip(batch.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, length), _pad_left(new.keys, length)])
            old.values = torch.cat([_pad_left(old.values, length), _pad_left(new.values, length)])
        batch.mask = torch.cat([_pad_left(batch.mask, length, dim=1), _pad_left(mask, length, dim=1)])
        batch.rows.extend(rows)

    # -- one decoding step for every row of a batch
    def _decode(self, batch: _Batch) -> None:
        rows = batch.rows
        input_ids = torch.tensor([[r.last] for r in rows], device=self.device)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)
        assert batch.mask is not None
        mask = torch.cat([batch.mask, torch.ones(len(rows), 1, dtype=batch.mask.dtype, device=self.device)], dim=1)
        # Without padding in the cache (one row, or rows of one length), the causal mask is implied.
        padded = bool((batch.mask == 0).any())
        with torch.inference_mode(), self._adapters_for(batch, [r.adapter for r in rows]) as kwargs:
            out = batch.model(input_ids=input_ids, attention_mask=mask if padded else None, position_ids=positions,
                              cache=batch.cache, use_cache=True, **kwargs)
        batch.mask = mask
        keep = []
        for i, (row, token) in enumerate(zip(rows, _sample_rows(out.logits[:, -1], rows), strict=True)):
            row.length += 1
            if row.gen.cancelled:
                row.gen.finish("cancelled")
                continue
            if not self._advance(row, token):
                keep.append(i)
        if len(keep) < len(rows):
            self._filter(batch, keep)

    def _filter(self, batch: _Batch, keep: list[int]) -> None:
        batch.rows = [batch.rows[i] for i in keep]
        if not keep:
            batch.cache, batch.mask = None, None
            return
        assert batch.mask is not None
        batch.mask = _keep_rows(batch.cache, batch.mask, torch.tensor(keep, device=self.device))

    def _advance(self, row: _Row, token: int) -> bool:
        """Record `token` for `row`; True when the row is finished (and its generation ended)."""
        gen = row.gen
        if gen.cancelled:
            gen.finish("cancelled")
            return True
        row.last = token
        row.produced += 1
        gen.token_ids.append(token)
        if token in row.eos:
            gen.emit(row.cutter.feed(row.decoder.finish()) + row.cutter.flush(), tokens=1)
            gen.finish("eos")
            return True
        gen.emit(row.cutter.feed(row.decoder.feed([token])), tokens=1)
        if row.cutter.stopped:
            gen.finish("stop_sequence")
            return True
        if row.produced >= gen.request.params.max_new_tokens:
            gen.emit(row.cutter.feed(row.decoder.finish()) + row.cutter.flush())
            gen.finish("max_new_tokens")
            return True
        return False

    # -- weights
    @contextlib.contextmanager
    def _adapters_for(self, batch: _Batch, names: list[str]):
        """Route each row through its adapter for one forward: yields the forward's extra kwargs.
        Batched LoRA (lora_batch.py) where every adapter of the batch allows it, else peft's
        mixed-batch forward (`adapter_names`)."""
        if self._peft is None or batch.model is not self._peft:
            yield {}
            return
        used = tuple(sorted({n for n in names if n != BASE_ADAPTER}))
        if not all(self._lora.supports(n) for n in used):
            yield {"adapter_names": names}
            return
        rows = torch.tensor([used.index(n) if n != BASE_ADAPTER else -1 for n in names], device=self.device)
        self._lora.plan = Plan(used, rows)
        try:
            yield {}
        finally:
            self._lora.plan = None

    def _select(self, weights: Weights | None) -> tuple[_Batch, Any, str]:
        """(the batch a request joins, its tokenizer, its adapter name in that batch)."""
        if weights is not None and self._fixed:
            raise TuneryError("this engine serves one loaded model as it is: submit requests without weights")
        if weights is not None and weights.kind == "full":
            _, batch, tokenizer = self._full_model(weights)
            return batch, tokenizer, BASE_ADAPTER
        self._ensure_base()
        assert self._base_batch is not None
        if weights is None:
            return self._base_batch, self.base_tokenizer, BASE_ADAPTER
        entry = self._adapter(weights)
        return self._base_batch, entry.tokenizer or self.base_tokenizer, entry.name

    def _ensure_base(self) -> None:
        if self._base_batch is not None:
            return
        if self.base_model is None:
            from tunery.models.load import column_major_linears, load_model, load_tokenizer
            from tunery.models.precision import resolve_precision
            from tunery.models.resolve import resolve_base

            self.resolved = self.resolved or resolve_base(self.base)
            self.base_tokenizer = load_tokenizer(self.resolved)
            self.base_model = load_model(self.resolved, precision=self.precision, device=self.device).eval()
            column_major_linears(self.base_model)
            self.base_loads += 1
            chosen = resolve_precision(self.precision, self.device)
            logger.info("predictions on %s run in %s on %s (%s)", self.base, chosen.name, self.device, chosen.reason)
        self._base_batch = _Batch(self.base_model)

    def _adapter(self, weights: Weights) -> _Adapter:
        """Load `weights`' adapter if needed (evicting the least recently used idle one)."""
        key, stamp = str(weights.path), weights_stamp(weights.path)
        entry = self._adapters.get(key)
        if entry is None or entry.stamp != stamp:
            self._check_base(weights)
            stale = entry
            entry = self._adapters[key] = self._load_adapter(weights, key, stamp)
            if stale is not None and not self._in_use(stale.name):  # retrained in place
                self._unload(stale.name)
        self._adapters.move_to_end(key)
        for old_key in list(self._adapters):
            if len(self._adapters) <= self.max_adapters:
                break
            old = self._adapters[old_key]
            if old_key != key and not self._in_use(old.name):
                del self._adapters[old_key]
                self._unload(old.name)
        return entry

    def _in_use(self, name: str) -> bool:
        return bool(self._base_batch and any(r.adapter == name for r in self._base_batch.rows))

    def _unload(self, name: str) -> None:
        """Unload an adapter. Rows name their adapter per batch, so which one peft calls "active"
        means nothing here: its notice about deleting the active one is dropped."""
        import warnings

        self._lora.forget(name)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            self._peft.delete_adapter(name)

    def _load_adapter(self, weights: Weights, key: str, stamp: tuple) -> _Adapter:
        from peft import PeftModel

        # peft adapter names become nn.ModuleDict keys, which may not contain "."; a hash of the
        # path (and stamp, so a retrained copy can coexist briefly with the stale one) is safe.
        name = "adapter_" + hashlib.sha256(f"{key}|{stamp}".encode()).hexdigest()[:16]
        tokenizer = load_tokenizer_dir(weights.tokenizer, weights.source) if weights.tokenizer else None
        assert self._base_batch is not None
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self.base_model, key, adapter_name=name, is_trainable=False, torch_device=str(self.device)
                ).eval()
                self._base_batch.model = self._peft
                self._lora = BatchedLora(self._peft)
            else:
                self._peft.load_adapter(key, adapter_name=name, is_trainable=False, torch_device=str(self.device))
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            if self._peft is not None and name in self._peft.peft_config:
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
                f"(sha256 {weights.base_sha256[:12]}), but this engine serves {self.base!r} (sha256 {served[:12]})"
            )

    def _full_model(self, weights: Weights) -> tuple:
        from tunery.models.load import column_major_linears, load_model
        from tunery.models.resolve import ResolvedBase

        key, stamp = str(weights.path), weights_stamp(weights.path)
        cached = self._full.get(key)
        if cached is not None and cached[0] == stamp:
            return cached
        if weights.tokenizer is None:
            raise TuneryError(f"weights {weights.source!r}: no tokenizer saved with the model in {key}")
        # Keep one full model: the previous one goes once its rows are done.
        for old_key, (_, batch, _) in list(self._full.items()):
            if not batch.rows:
                del self._full[old_key]
        tokenizer = load_tokenizer_dir(weights.tokenizer, weights.source)
        # The run's model folder as it is (its tokenizer is the run's, beside it; no content hash:
        # the weights stamp already tells a retrained copy apart).
        folder = ResolvedBase(name=key, kind="dir", path=key, source=key, sha256=None)
        model = load_model(folder, precision=self.precision, device=self.device).eval()
        column_major_linears(model)
        self.full_loads += 1
        self._full[key] = (stamp, _Batch(model), tokenizer)
        return self._full[key]


def _sample_rows(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """The next token of each row from its logits ([rows, vocab]): the greedy rows' in one argmax
    (over fp32: a CPU's bf16 argmax is ~3× slower), the unfiltered ones' from one softmax, the
    others' each by `_sample`."""
    params = [r.gen.request.params for r in rows]
    early = [i for i, (r, p) in enumerate(zip(rows, params, strict=True)) if r.produced < p.min_new_tokens]
    logits = logits.float() if not early or logits.dtype != torch.float32 else logits.clone()
    for i in early:  # min_new_tokens: end-of-sequence is not a choice yet
        logits[i, [t for t in rows[i].eos if t < logits.shape[-1]]] = float("-inf")
    greedy = logits.argmax(-1).tolist() if any(p.greedy for p in params) else None
    # Rows that sample from the whole vocabulary (no top_k, no top_p: GRPO's rollouts) need no
    # sort (it was 40 % of a rollout's time): their softmax in one batched op, each row's draw from
    # its own generator.
    whole = [i for i, p in enumerate(params) if not p.greedy and _unfiltered(p, logits.shape[-1])]
    probs: dict[int, torch.Tensor] = {}
    if whole:
        temps = torch.tensor([float(params[i].temperature) for i in whole], device=logits.device).unsqueeze(1)
        probs = dict(zip(whole, torch.softmax(logits[whole] / temps, dim=-1), strict=True))
    out = []
    for i, (row, p) in enumerate(zip(rows, params, strict=True)):
        if greedy is not None and p.greedy:
            out.append(greedy[i])
        elif i in probs:
            out.append(int(torch.multinomial(probs[i], 1, generator=row.generator)))
        else:
            out.append(_sample(logits[i], p, row.generator))
    return out


def _unfiltered(params, vocab: int) -> bool:
    return (not params.top_k or params.top_k >= vocab) and params.top_p >= 1.0


def _sample(logits: torch.Tensor, params, generator: torch.Generator) -> int:
    """One token from one row's logits: greedy, or temperature → top-k → top-p → a draw from
    `generator` (transformers' order of the same warpers)."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / float(params.temperature)
    nucleus = None
    if params.top_k and params.top_k < scores.shape[-1]:
        values, indices = torch.topk(scores, params.top_k)  # sorted, largest first
    elif params.top_p < 1.0 and (nucleus := _nucleus(scores, float(params.top_p))) is not None:
        values, indices = nucleus
    else:
        values, indices = torch.sort(scores, descending=True)
    if params.top_p < 1.0 and nucleus is None:
        values, indices = _top_p_prefix(values, indices, torch.cumsum(torch.softmax(values, dim=-1), dim=-1),
                                        float(params.top_p))
    probs = torch.softmax(values, dim=-1)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(indices[choice])


_NUCLEUS_HEADS = (64, 1024)


def _top_p_prefix(values: torch.Tensor, indices: torch.Tensor, cumulative: torch.Tensor,
                  top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest prefix of `values` (largest first; `cumulative` their running probability)
    whose mass reaches top_p, at least one token: what transformers' top-p keeps."""
    cut = int(torch.searchsorted(cumulative, torch.tensor(top_p))) + 1
    return values[:cut], indices[:cut]


def _nucleus(scores: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-p's kept tokens (values and indices, largest first) without sorting the vocabulary: the
    largest 64 (then 1024) by `topk`, whose probabilities under the whole softmax hold the
    smallest prefix reaching `top_p` whenever their mass reaches it; None when it does not. The
    same prefix as the sort's (ties at the cut aside), at a few percent of its cost: sorting
    49k scores was ~2.5 ms a row, a third of a decode step at 8 rows (OpenAI's requests carry
    top_p without top_k)."""
    vocab = scores.shape[-1]
    log_total = torch.logsumexp(scores, dim=-1)
    for k in _NUCLEUS_HEADS:
        if k >= vocab:
            return None
        values, indices = torch.topk(scores, k)
        cumulative = torch.cumsum(torch.exp(values - log_total), dim=-1)
        if float(cumulative[-1]) >= top_p:
            return _top_p_prefix(values, indices, cumulative, top_p)
    return None


def _keep_rows(cache, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Keep the rows `index` of a left-padded cache (in place) and of its mask (returned); columns
    that are padding for every kept row are dropped from the left."""
    mask = mask.index_select(0, index)
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if len(real) else 0
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return mask[:, start:]


def _pad_left(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end generation: the model's configured eos plus the tokenizer's. Training
    appends the tokenizer's eos to each completion, and an instruct base's generation config may
    name a different one (e.g. an end-of-turn token), so both must stop."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def load_tokenizer_dir(path: Path, source: str):
    from transformers import AutoTokenizer

    from tunery.models.resolve import quiet_transformers

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise TuneryError(f"weights {source!r}: cannot load the tokenizer in {path}: {e}") from e
