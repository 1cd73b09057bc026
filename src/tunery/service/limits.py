"""Per-owner limits, the operator's fair share of one service among many users
(`store.models.LIMITS` says what each limit holds and its built-in value):

- `check_queue`: a new training beyond the owner's `queued_trainings` is refused (Busy, 429);
  `trainings` (running at once) is kept by the workers' claim (`Store.claim_training`), which
  passes over an owner at the limit, so another owner's training starts first;
- `predictions`: what one server runs or queues for an owner at once (`PredictionRunner.reserve`),
  and the engines start waiting requests fairly (`infer.generation.fair_index`): a flood from one
  owner delays another owner's prediction by one batch slot at most;
- `RequestRate`: authenticated requests per owner per minute on this server (a sliding window).

Every refusal is a `Busy` with `retry_after` and a message naming the limit, its value and how
an operator changes it; each API renders it as its 429."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

from tunery.service.errors import Busy, Invalid
from tunery.store.models import DEFAULT_OWNER, LIMITS, Limits
from tunery.store.store import Store

#: How long a server keeps an owner's limits before reading them again.
CACHE_SECONDS = 10.0
#: What the CLI and the admin route call each limit, for people.
DESCRIBE = {
    "trainings": "trainings running at once",
    "queued_trainings": "trainings queued at once",
    "predictions": "predictions at once on one server",
    "requests_per_minute": "requests per minute on one server",
}
QUEUE_RETRY_SECONDS = 60.0


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _change_hint(name: str) -> str:
    return f"an operator can change it with `tunery owners set-limits OWNER --{name.replace('_', '-')} N`"


def check_queue(store: Store, owner: str) -> None:
    """Busy when `owner` already has as many trainings waiting for a worker as their limit allows."""
    limit = store.limits(owner).queued_trainings
    if not limit:
        return
    queued = store.training_counts(owner)["queued"]
    if queued >= limit:
        raise Busy(f"Request was throttled: {owner!r} already has {_count(queued, 'training')} waiting for a worker, "
                   f"the most allowed ({DESCRIBE['queued_trainings']}: {limit}); wait for one to start, or "
                   f"cancel one ({_change_hint('queued_trainings')})", retry_after=QUEUE_RETRY_SECONDS,
                   code="rate_limit_exceeded")


def prediction_limit(limits: Limits, max_queue: int) -> int:
    """How many predictions one server holds for the owner at once (0: no limit beyond the server's)."""
    return max_queue if limits.predictions is None else limits.predictions


def prediction_refusal(owner: str, held: int, limit: int) -> Busy:
    return Busy(f"Request was throttled: {owner!r} already has {_count(held, 'prediction')} running or queued on this "
                f"server, the most allowed ({DESCRIBE['predictions']}: {limit}; {_change_hint('predictions')}). "
                "Expected available in 1 second.", code="rate_limit_exceeded")


class OwnerLimitCache:
    """Owners' limits as the store has them, read again after CACHE_SECONDS (limits change rarely;
    every request reads them)."""

    def __init__(self, store: Store, ttl: float = CACHE_SECONDS):
        self.store = store
        self.ttl = ttl
        self._cached: dict[str, tuple[float, Limits]] = {}
        self._lock = threading.Lock()

    def get(self, owner: str) -> Limits:
        now = time.monotonic()
        with self._lock:
            found = self._cached.get(owner)
        if found is not None and now - found[0] < self.ttl:
            return found[1]
        limits = self.store.limits(owner)
        with self._lock:
            self._cached[owner] = (now, limits)
        return limits

    def forget(self) -> None:
        with self._lock:
            self._cached.clear()


class RequestRate:
    """Each owner's requests in the last minute on this server (a sliding window of their times)."""

    WINDOW = 60.0

    def __init__(self) -> None:
        self._times: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, owner: str, per_minute: int, now: float | None = None) -> None:
        """Count one request of `owner`; Busy (nothing counted) when `per_minute` were answered in
        the last 60 seconds, with the seconds until the oldest of them leaves the window."""
        if not per_minute:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._times.setdefault(owner, deque())
            while times and times[0] <= now - self.WINDOW:
                times.popleft()
            if len(times) >= per_minute:
                wait = max(1.0, math.ceil(times[0] + self.WINDOW - now))
                raise Busy(f"Request was throttled: {owner!r} sent {len(times)} requests in the last minute, the "
                           f"most allowed ({DESCRIBE['requests_per_minute']}: {per_minute}; "
                           f"{_change_hint('requests_per_minute')}). Expected available in {wait:.0f} seconds.",
                           retry_after=wait, code="rate_limit_exceeded")
            times.append(now)


def parse_changes(given: dict[str, str | int | None]) -> dict[str, int | None]:
    """The limits to change from what a user typed: a number (text or not) sets one, `default`
    unsets it (it falls through to everyone's, then the built-in value); None: untouched. Invalid
    naming the field for text that is neither; the store checks the names and the range."""
    changes: dict[str, int | None] = {}
    for name, value in given.items():
        if value is None:
            continue
        if isinstance(value, str):
            text = value.strip().lower()
            if text != "default" and not text.isdigit():
                raise Invalid(f"{name}: {value!r} is not a whole number >= 0 (0: no limit) or 'default'",
                              field=name)
            changes[name] = None if text == "default" else int(text)
        else:
            changes[name] = value
    return changes


def set_limits(store: Store, owner: str, given: dict[str, Any]) -> dict[str, Any]:
    """Change `owner`'s limits (DEFAULT_OWNER: everyone's) from user input; what applies now."""
    if not owner:
        raise Invalid("owner: required (or '*' for everyone's limits)", field="owner")
    changes = parse_changes(given)
    if not changes:
        raise Invalid(f"nothing to change: give at least one of {', '.join(LIMITS)}", field="limits")
    try:
        store.set_limits(owner, changes)
    except ValueError as exc:  # not a limit, or not a whole number >= 0
        raise Invalid(str(exc), field=str(exc).partition(":")[0]) from None
    return record(store, owner)


def record(store: Store, owner: str) -> dict[str, Any]:
    """What applies to `owner` and where each value comes from, as the CLI and the admin route show it."""
    limits = store.limits(owner)
    return {"owner": owner, "limits": {name: getattr(limits, name) for name in LIMITS},
            "source": limits.source}


def records(store: Store) -> list[dict[str, Any]]:
    """Everyone's limits first, then each owner with limits of their own."""
    owners = [row.owner for row in store.limit_rows()]
    if DEFAULT_OWNER not in owners:
        owners.insert(0, DEFAULT_OWNER)
    return [record(store, owner) for owner in owners]

