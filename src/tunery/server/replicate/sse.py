"""A prediction's output as server-sent events, in the form the official client decodes.

Events: `output` (a text piece), `error` (JSON `{"detail": ...}`), `done` (`{}` or
`{"reason": "canceled" | "error"}`); each has an `id:` line, without which the client drops it.
The client strips one space after `data:`, so every data line is written as `data: ` + text,
which keeps a piece's own leading space; a piece with line breaks goes as several data lines.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

from tunery.service.prediction_runner import Channel, Event
from tunery.store.models import TERMINAL, Prediction

KEEPALIVE_SECONDS = 10.0  # a comment line this often keeps proxies and client read timeouts quiet
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encode(event: Event) -> str:
    """One event in the wire format, ending with the blank line that dispatches it."""
    if event.kind == "output":
        data = event.data
    elif event.kind == "error":
        data = json.dumps({"detail": event.data})
    else:
        data = json.dumps({"reason": event.data} if event.data else {})
    lines = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    return f"event: {event.kind}\nid: {event.id}\n{lines}\n"


def events_from_row(row: Prediction) -> list[Event]:
    """The events of a prediction known only from its row (finished before this server started,
    or long enough ago that its channel was dropped): its output, then how it ended. A row that
    is not finished but has no channel was interrupted by a restart, and ends in an error."""
    kinds: list[tuple[str, str]] = [("output", piece) for piece in row.output or [] if isinstance(piece, str)]
    if row.status == "succeeded":
        kinds.append(("done", ""))
    elif row.status == "canceled":
        kinds.append(("done", "canceled"))
    else:
        error = row.error if row.status in TERMINAL else "the prediction was interrupted by a server restart"
        kinds += [("error", error or "prediction failed"), ("done", "error")]
    return [Event(i, kind, data) for i, (kind, data) in enumerate(kinds, start=1)]


async def stream(row: Prediction, channel: Channel | None) -> AsyncIterator[str]:
    """The SSE body for `row`: everything published so far, then live events until `done`."""
    if channel is None:
        for event in events_from_row(row):
            yield encode(event)
        return

    loop = asyncio.get_running_loop()
    pending: asyncio.Queue[Event] = asyncio.Queue()

    def listener(event: Event) -> None:  # called on the runner's thread
        try:
            loop.call_soon_threadsafe(pending.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutting down): nobody to tell
            pass

    backlog = channel.subscribe(listener)
    try:
        for event in backlog:
            yield encode(event)
            if event.kind == "done":
                return
        while True:
            try:
                event = await asyncio.wait_for(pending.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield ": keepalive\n\n"
                continue
            yield encode(event)
            if event.kind == "done":
                return
    finally:
        channel.unsubscribe(listener)


async def wait_done(channel: Channel, timeout: float) -> bool:
    """Wait (on the event loop, holding no thread) until the prediction of `channel` is done, for
    at most `timeout` seconds; True when it is."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def listener(event: Event) -> None:  # called on the runner's thread
        if event.kind == "done":
            try:
                loop.call_soon_threadsafe(done.set)
            except RuntimeError:  # the event loop has closed
                pass

    channel.subscribe(listener)
    try:
        if channel.finished.is_set():
            return True
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            return channel.finished.is_set()
        return True
    finally:
        channel.unsubscribe(listener)

