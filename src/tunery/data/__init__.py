"""The data pipeline: fetch a JSONL file, validate it, split it, tokenize it with loss masks,
lay the examples out in sequences (unpacked, packed or wrapped) and collate them into batches.

Importing this package does not import torch; `Collator` loads it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunery.data.jsonl import Dataset, Format, check_method, read_jsonl
from tunery.data.packing import PackingStats, Sequence, pack, packing_stats, padding_fraction, unpacked, wrap
from tunery.data.sources import fetch, sha256_file
from tunery.data.split import split_train_validation
from tunery.data.tokenize import (
    IGNORE_INDEX,
    Example,
    PreferencePair,
    preference_examples,
    prompt_examples,
    prompt_ids,
    rft_prompt,
    tokenize_rows,
)

if TYPE_CHECKING:
    from tunery.data.collate import Collator

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "Dataset",
    "Example",
    "Format",
    "PackingStats",
    "PreferencePair",
    "Sequence",
    "check_method",
    "fetch",
    "pack",
    "packing_stats",
    "padding_fraction",
    "preference_examples",
    "prompt_examples",
    "rft_prompt",
    "prompt_ids",
    "read_jsonl",
    "sha256_file",
    "split_train_validation",
    "tokenize_rows",
    "unpacked",
    "wrap",
]


def __getattr__(name: str) -> Any:
    # Lazily, so that validating a file (e.g. in the CLI or the HTTP server) does not pay for torch.
    if name == "Collator":
        from tunery.data.collate import Collator

        return Collator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
