"""The machine-readable event stream of a training: one JSON object per line.

Every event has `type` and `time` (Unix seconds). Types, in the order a run emits them:
`started`, `data` (dataset statistics), `step` (train metrics), `validation`, `sample`
(the validation_prompt's generation), `checkpoint`, `log` (a human-readable line),
`warning`, then exactly one of `succeeded` or `failed` (with `error`). The service's worker
reads this stream from the child process that trains.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf; write them as null rather than produce unparsable lines."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventSink:
    """Writes events to any number of JSONL streams, flushing each line so a reader tailing
    the file sees it at once."""

    def __init__(self, *targets: str | Path | IO[str] | None):
        self._streams: list[IO[str]] = []
        self._owned: list[IO[str]] = []
        self._lock = threading.Lock()
        self._listeners: list[Callable[[dict], None]] = []
        for t in targets:
            self.add(t)

    def add(self, target: str | Path | IO[str] | None) -> None:
        if target is None:
            return
        if target == "-":
            self._streams.append(sys.stdout)
        elif isinstance(target, (str, Path)):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            f = open(target, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._streams.append(f)
            self._owned.append(f)
        else:
            self._streams.append(target)

    def listen(self, listener: Callable[[dict], None]) -> None:
        """Call `listener` with every event after it is written (e.g. to echo log lines to a person)."""
        self._listeners.append(listener)

    def emit(self, type: str, **data: Any) -> dict:
        event = {"type": type, "time": round(time.time(), 3), **_clean(data)}
        line = json.dumps(event, ensure_ascii=False, default=str)
        with self._lock:
            for s in self._streams:
                s.write(line + "\n")
                s.flush()
        for listener in self._listeners:
            listener(event)
        return event

    def close(self) -> None:
        for f in self._owned:
            f.close()
        self._owned.clear()
        self._streams.clear()


def read_events(path: str | Path) -> list[dict]:
    """All complete events in a JSONL event file (a torn last line is ignored)."""
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events
