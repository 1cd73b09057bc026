"""Predictions run inside the server process: each on a thread of its own that submits it to the
serving engine of its base model (`infer.engines.engine_for`: one per base, created on first use,
kept loaded) and relays the engine's text stream. The engine batches the running predictions;
the runner holds at most `capacity` of them (the engine's batch plus its queue): beyond that the
API answers 429 before creating anything.

Each prediction has a `Channel`: the events produced so far and the live listeners (the SSE
streams), so a client that connects late gets the output so far and then the live events.
While text streams, one flusher writes the output of every running prediction that has new
text, in one transaction every FLUSH_SECONDS (and learns of cancels asked on other servers);
each prediction's end is committed to the store before its channel says "done", so a client
that sees "done" and then GETs the prediction finds it finished. Nothing here imports torch
until the first prediction.

Several servers may share one database: each prediction is leased to the runner of the server
that took it, and the lease is renewed every few seconds while that server lives. When a server
dies its unfinished predictions' leases expire and a live (or the restarted) server takes them
over and runs them again; a prediction a live server holds is never run twice.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tunery.service.errors import Busy
from tunery.service.limits import OwnerLimitCache, prediction_limit, prediction_refusal
from tunery.settings import Settings, get_settings
from tunery.store.store import Store

if TYPE_CHECKING:
    from tunery.infer.generation import Engine, Generation, SamplingParams

log = logging.getLogger("tunery.service.predictions")

FLUSH_SECONDS = 0.5
KEEP_FINISHED = 256  # finished channels kept in memory for late SSE clients (older ones: from the row)

#: A version's prediction inputs and their SamplingParams names (max_tokens is the newer Replicate
#: models' name for max_new_tokens). The defaults are SamplingParams' own.
SAMPLING_INPUTS = {
    "max_new_tokens": "max_new_tokens",
    "max_tokens": "max_new_tokens",
    "min_new_tokens": "min_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "stop_sequences": "stop_sequences",
    "seed": "seed",
}

def sampling_from_input(inputs: dict[str, Any]) -> tuple[str, SamplingParams]:
    """(prompt, SamplingParams) of a prediction's input (unknown keys are ignored, as Cog does).
    ValueError naming the first bad value, or a missing / non-string prompt."""
    from tunery.infer.generation import SamplingParams

    if not isinstance(inputs.get("prompt"), str):
        raise ValueError("prompt: required, and must be a string")
    given = {SAMPLING_INPUTS[k]: v for k, v in inputs.items() if k in SAMPLING_INPUTS and v is not None}
    return inputs["prompt"], SamplingParams(**given)


@dataclass(frozen=True)
class Event:
    """One server-sent event: `kind` is output | error | done; `data` is the text piece, the error
    detail, or the done reason ("" when it succeeded, "canceled", "error")."""

    id: int
    kind: str
    data: str


class Channel:
    """The events of one prediction, in order, and the callbacks listening for new ones."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.finished = threading.Event()  # set once "done" is published (the row is final by then)
        self._listeners: list[Callable[[Event], None]] = []
        self._lock = threading.Lock()

    def publish(self, kind: str, data: str) -> None:
        with self._lock:
            event = Event(len(self.events) + 1, kind, data)
            self.events.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)
        if kind == "done":
            self.finished.set()

    def subscribe(self, listener: Callable[[Event], None]) -> list[Event]:
        """Register `listener` for future events; returns the events published before it (no
        event is missed or repeated between the two)."""
        with self._lock:
            self._listeners.append(listener)
            return list(self.events)

    def unsubscribe(self, listener: Callable[[Event], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)


@dataclass
class _Running:
    """A prediction this runner holds: what to run, and how to stop it."""

    id: str
    base: str
    weights: str | None
    prompt: str
    params: SamplingParams
    owner: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    generation: Generation | None = None
    thread: threading.Thread | None = None
    pieces: list[str] = field(default_factory=list)  # the output so far (appended on its thread)
    running: bool = False  # started in the store ("processing"), not yet finished
    flushed: int = 0  # how many pieces the store has


class PredictionRunner:
    """Runs predictions on the serving engines, many at once. `start()` it once, `stop()` on shutdown."""

    def __init__(self, store: Store, *, lease_seconds: float = 30.0, capacity: int | None = None,
                 settings: Settings | None = None):
        self.settings = settings = settings or get_settings()
        self.store = store
        self.lease_seconds = lease_seconds
        #: Predictions this runner holds at most (running or waiting); more are refused with 429.
        self.capacity = capacity or settings.max_batch + settings.max_queue
        #: Each owner's limits (`predictions`: how many of the capacity one owner may hold).
        self.limits = OwnerLimitCache(store)
        #: This runner's name on the predictions it holds (one per server process).
        self.runner_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stopping = threading.Event()
        self._started = False
        self._lease_thread: threading.Thread | None = None
        self._flush_thread: threading.Thread | None = None
        self._jobs: dict[str, _Running] = {}
        self._channels: OrderedDict[str, Channel] = OrderedDict()
        self._engines: dict[str, Engine] = {}
        self._own_engines: set[str] = set()  # made here (closed on stop), not given by use_engine
        self._reserved = 0
        self._held: Counter[str | None] = Counter()  # per owner: reserved, running and waiting
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start running predictions, and keeping this runner's leases: the first round takes
        over what a server that died left unfinished (a restart runs those again at once)."""
        if not self._started:
            self._stopping.clear()
            self._started = True
            self.keep_leases()
            self._lease_thread = threading.Thread(target=self._lease_loop, name="tunery-prediction-leases",
                                                  daemon=True)
            self._lease_thread.start()
            self._flush_thread = threading.Thread(target=self._flush_loop, name="tunery-prediction-output",
                                                  daemon=True)
            self._flush_thread.start()

    def keep_leases(self) -> int:
        """One round: renew this runner's leases, then take over and queue the predictions whose
        server is gone. Returns how many were taken over."""
        self.store.renew_prediction_leases(self.runner_id, self.lease_seconds)
        adopted = self.store.adopt_orphaned_predictions(self.runner_id, self.lease_seconds)
        for row, version in adopted:
            log.info("taking over prediction %s, left unfinished by a server that stopped", row.id)
            try:
                prompt, params = sampling_from_input(row.input or {})
            except ValueError as exc:  # checked when it was created: only a hand-edited row gets here
                self.store.finish_prediction(row.id, status="failed", error=str(exc), runner=self.runner_id)
                continue
            self.submit(row.id, base=version.base_name, weights=version.run_url, prompt=prompt, params=params,
                        owner=row.owner)
        return len(adopted)

    def _lease_loop(self) -> None:
        while not self._stopping.wait(self.lease_seconds / 4):
            try:
                self.keep_leases()
            except Exception:  # the database went away, say: try again next round
                log.exception("renewing prediction leases failed")

    def flush(self) -> int:
        """One round: write the new output of every running prediction in one transaction, and
        stop those whose cancel was asked on another server. Returns how many were written."""
        with self._lock:
            running = [job for job in self._jobs.values() if job.running]
            changed = {job.id: job.pieces[:] for job in running if len(job.pieces) > job.flushed}
        canceled = self.store.set_predictions_output(changed, self.runner_id, watch=[job.id for job in running])
        for job in running:
            if job.id in changed:
                job.flushed = len(changed[job.id])
            if job.id in canceled:
                self._cancel(job)
        return len(changed)

    def _flush_loop(self) -> None:
        while not self._stopping.wait(FLUSH_SECONDS):
            try:
                self.flush()
            except Exception:  # the database went away, say: try again next round
                log.exception("writing the predictions' output failed")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop: what is running stops within a token and, with what is queued, is handed back
        (its lease released, so the next server to start, or another one on the same database,
        runs it again at once): a shutdown loses no prediction. Waits for the thread to end."""
        self._stopping.set()
        for attr in ("_lease_thread", "_flush_thread"):
            thread = getattr(self, attr)
            if thread is not None:
                thread.join(timeout)
                setattr(self, attr, None)
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            self._cancel(job)
        deadline = time.monotonic() + timeout
        for job in jobs:
            if job.thread is not None:
                job.thread.join(max(0.0, deadline - time.monotonic()))
        for base in list(self._own_engines):
            self._engines.pop(base).close()
        self._own_engines.clear()
        self._started = False
        try:
            released = self.store.release_predictions(self.runner_id)
        except Exception:  # the database is gone: the leases expire by themselves
            log.exception("handing back unfinished predictions failed")
        else:
            if released:
                log.info("handed back %d unfinished predictions for another server to run", released)

    def reserve(self, owner: str | None = None) -> Busy | None:
        """Reserve room for one new prediction of `owner`: None when reserved, else the refusal
        (Busy) when `capacity` are already held, or as many of `owner`'s as their `predictions`
        limit allows. A reservation is used by `submit(..., reserved=True)` or given back with
        `unreserve(owner)`."""
        limit = prediction_limit(self.limits.get(owner), self.settings.max_queue) if owner is not None else 0
        with self._lock:
            if len(self._jobs) + self._reserved >= self.capacity:
                return Busy(f"Request was throttled: this server already holds {self.capacity} predictions (its "
                            "engine's batch and queue). Expected available in 1 second.")
            if limit and self._held[owner] >= limit:
                return prediction_refusal(str(owner), self._held[owner], limit)
            self._reserved += 1
            self._held[owner] += 1
            return None

    def unreserve(self, owner: str | None = None) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - 1)
            self._release(owner)

    def _release(self, owner: str | None) -> None:  # with the lock held
        if self._held[owner] <= 1:
            self._held.pop(owner, None)
        else:
            self._held[owner] -= 1

    def held(self, owner: str | None) -> int:
        """How many predictions `owner` holds here now (reserved, waiting or running)."""
        with self._lock:
            return self._held[owner]

    def submit(self, prediction_id: str, *, base: str, weights: str | None, prompt: str, params: SamplingParams,
               owner: str | None = None, reserved: bool = False) -> Channel:
        """Start `owner`'s prediction (its row exists, status "starting") on a thread of its own;
        returns its channel. The API reserves room first; a prediction taken over from a server
        that died runs even beyond capacity and limits (its engine queues it)."""
        job = _Running(prediction_id, base, weights, prompt, params, owner)
        job.thread = threading.Thread(target=self._thread_main, args=(job,),
                                      name=f"tunery-prediction-{prediction_id}", daemon=True)
        with self._lock:
            if reserved:
                self._reserved = max(0, self._reserved - 1)
            else:
                self._held[owner] += 1
            self._jobs[prediction_id] = job
            channel = self._channels[prediction_id] = Channel()
        job.thread.start()
        return channel

    def use_engine(self, base: str, engine: Any) -> None:
        """Serve the base model named `base` with `engine` (anything with Engine.submit): a model
        loaded elsewhere, or a scripted one in tests."""
        self._engines[base] = engine

    def forget_weights(self, weights: Any) -> None:
        """Unload trained weights (an infer.weights.Weights) from every engine that holds them, once
        no running request uses them: their version was deleted."""
        with self._lock:
            engines = list(self._engines.values())
        for engine in engines:
            unload = getattr(engine, "unload", None)
            if unload is not None:
                try:
                    unload(weights)
                except Exception:  # an engine that can not unload keeps them until it evicts them
                    log.exception("unloading %s failed", weights.source)

    def channel(self, prediction_id: str) -> Channel | None:
        """The live channel of a prediction submitted since this server started; None otherwise."""
        with self._lock:
            return self._channels.get(prediction_id)

    def cancel(self, prediction_id: str) -> None:
        """Stop the prediction within one token if it is running; a queued one is skipped."""
        with self._lock:
            job = self._jobs.get(prediction_id)
        if job is not None:
            self._cancel(job)

    @staticmethod
    def _cancel(job: _Running) -> None:
        job.cancel.set()
        if job.generation is not None:
            job.generation.cancel()

    def _thread_main(self, job: _Running) -> None:
        try:
            self._run(job)
        except Exception:  # anything one prediction does must end it, not leave it running
            log.exception("prediction %s crashed its runner thread", job.id)
            self._finish(job, "failed", None, {}, "internal error in the prediction runner")
        finally:
            with self._lock:
                if self._jobs.pop(job.id, None) is not None:
                    self._release(job.owner)
                self._forget_finished()

    def _run(self, job: _Running) -> None:
        if self._stopping.is_set():
            return  # shutting down: handed back by stop()
        if job.cancel.is_set() or self.store.start_prediction(job.id, self.runner_id) is None:
            self._finish(job, "canceled", None, {})  # canceled (or gone, or taken over) before it started
            return
        job.running = True
        pieces = job.pieces
        metrics: dict[str, Any] = {}
        channel = self.channel(job.id)
        try:
            from tunery.infer.generation import Request

            request = Request.make(job.prompt, weights=job.weights, params=job.params, settings=self.settings,
                                   owner=job.owner)
            job.generation = generation = self._engine(job.base).submit(request, block=True)
            if job.cancel.is_set():
                generation.cancel()
            for piece in generation:
                pieces.append(piece)  # written to the store by the flusher
                if channel is not None:
                    channel.publish("output", piece)
            metrics = generation.metrics
        except Exception as exc:  # a bad adapter, a model that fails to load, ...
            log.warning("prediction %s failed: %s", job.id, exc)
            if job.generation is not None:
                metrics = job.generation.metrics
            self._finish(job, "failed", pieces, metrics, str(exc) or type(exc).__name__)
            return
        if job.cancel.is_set() and self._stopping.is_set() and not self.store.is_cancel_requested_prediction(job.id):
            return  # stopped by the shutdown, not by a cancel: handed back by stop(), to run again
        self._finish(job, "canceled" if job.cancel.is_set() else "succeeded", pieces, metrics)

    def _finish(
        self,
        job: _Running,
        status: str,
        pieces: list[str] | None,
        metrics: dict[str, Any],
        error: str | None = None,
    ) -> None:
        """Commit the end to the store, then tell the listeners."""
        job.running = False
        row = self.store.finish_prediction(
            job.id,
            status=status,
            output=pieces,
            error=error,
            metrics={k: v for k, v in metrics.items() if v is not None},
            runner=self.runner_id,
        )
        channel = self.channel(job.id)
        if channel is None:
            return
        if row is None:  # this server lost its lease (the database was out of reach) and another took it
            status, error = "failed", "this prediction was taken over by another server; get it again"
        if error is not None:
            channel.publish("error", error)
        channel.publish("done", {"succeeded": "", "canceled": "canceled"}.get(status, "error"))

    def engine(self, base: str) -> Engine:
        """The serving engine of the base model `base` (made on first use, kept loaded)."""
        return self._engine(base)

    def _engine(self, base: str) -> Engine:
        with self._lock:
            engine = self._engines.get(base)
            if engine is None:
                from tunery.infer.engines import engine_for

                engine = self._engines[base] = engine_for(base, self.settings)
                self._own_engines.add(base)
            return engine

    def _forget_finished(self) -> None:
        """Drop the oldest finished channels beyond KEEP_FINISHED (called with the lock held)."""
        finished = [pid for pid, ch in self._channels.items() if ch.finished.is_set()]
        for pid in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._channels[pid]
