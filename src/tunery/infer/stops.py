"""Stop sequences: parse them the way Replicate does, and cut a text stream at the first one.

This module is pure Python (no torch) so the cutting rules can be tested on their own and reused
by anything that streams text, not just the model runner.
"""

from __future__ import annotations

from collections.abc import Iterable


def parse_stop_sequences(stops: str | Iterable[str] | None) -> list[str]:
    """Turn Replicate's `stop_sequences` input into a list of non-empty stop strings.

    A string is split on commas ("<end>,###" -> ["<end>", "###"]); a list or tuple is taken as
    given, which is the only way to stop on a text that contains a comma. Whitespace is kept, not
    stripped: "\\n" and " Q:" are common, meaningful stops. Empty entries (",," or a trailing comma)
    are dropped. Raises ValueError for anything that is not a string or a sequence of strings.
    """
    if stops is None:
        return []
    if isinstance(stops, str):
        parts = stops.split(",")
    elif isinstance(stops, (list, tuple)):
        bad = [s for s in stops if not isinstance(s, str)]
        if bad:
            raise ValueError(f"stop_sequences: every entry must be a string, got {bad[0]!r}")
        parts = list(stops)
    else:
        raise ValueError(
            f"stop_sequences: expected a comma-separated string or a list of strings, got {type(stops).__name__}"
        )
    # Keep the first occurrence of each stop, in the order given, so error messages and
    # metrics read the way the user wrote them.
    return list(dict.fromkeys(p for p in parts if p))


class StopCutter:
    """Cuts a stream of text pieces before the first occurrence of any stop sequence.

    Promises, for any way the text is split into pieces:

    - the concatenation of everything returned by `feed` and `flush` equals the text up to, not
      including, the earliest-starting stop sequence in the first fed prefix that holds a
      complete one (or the full text when none occurs). Generation ends as soon as a stop
      appears, as OpenAI's and vLLM's do: a longer stop that started earlier but would complete
      only in a later piece ("><<" against "<", fed "><" then "<") is never reached;
    - no returned piece ever contains a stop sequence, part of one that later completes, or
      anything after one: text that could be the start of a stop is held back until the next
      pieces show it is not one;
    - once a stop is seen, `stopped` is True and every later `feed` returns "".

    With no stop sequences every piece is passed through unchanged.
    """

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = [s for s in stops if s]
        self.stopped = False
        self.stop: str | None = None  # the stop sequence that ended the text, once one has
        self._held = ""
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> str:
        """Add the next piece of text; return the part of it (and of earlier held-back text) that is
        now known to be output. May return "" while a possible stop sequence is pending."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        cut = self._earliest_stop(buf)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = self._pending_suffix(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The text stream has ended without completing a stop: release what was held back."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _earliest_stop(self, buf: str) -> int | None:
        """Index in `buf` where the first stop sequence starts, or None. When two stops occur, the
        one starting first wins, so nothing past the earliest stop can leak out."""
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if not hits:
            return None
        chosen = min(hits)
        self.stop = next(s for s in self.stops if buf.startswith(s, chosen))
        return chosen

    def _pending_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop sequence.

        The longest one starts earliest, so holding it back also holds back every shorter
        candidate. A complete stop cannot be a suffix here: `_earliest_stop` found none.
        """
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
