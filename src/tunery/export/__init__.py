"""Exporting a tuned model out of tunery, for runtimes that do not load a Hugging Face folder."""

from __future__ import annotations

from tunery.errors import TuneryError


class ExportError(TuneryError):
    """A model cannot be exported as asked (unsupported architecture or tokenizer, a missing file,
    or an export that does not read back as the model it came from). The message is one line."""
