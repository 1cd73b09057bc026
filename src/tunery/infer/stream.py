"""Text streaming: token ids to text pieces, a few tokens at a time.

`IncrementalDecoder` is what the embedded engine feeds each row's new tokens to. Why not
transformers' `TextIteratorStreamer`: it releases text only at word boundaries; here each token's
text is released as soon as it is complete.
"""

from __future__ import annotations

# Prompt tokens decoded along with the first new ones, so that tokenizers which drop a leading
# space at the start of a decode (SentencePiece) still render the first new word's space.
PROMPT_CONTEXT = 5


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
