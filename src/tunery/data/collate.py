"""Stack Sequences into padded tensors for one forward pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tunery.data.tokenize import IGNORE_INDEX


class Collator:
    """Right-pads a list of sequences to the longest one (rounded up to ``pad_to_multiple_of``).

    Each feature is a mapping (or an object with attributes, such as a `Sequence`) with
    ``input_ids``, ``labels`` and, when packed, ``position_ids``, all lists of ints.

    Unpacked, the batch is ``input_ids``, ``labels`` and ``attention_mask`` (1 on real tokens).

    Packed, the batch is ``input_ids``, ``labels`` and ``position_ids``, with no attention
    mask: transformers then builds the mask from the position ids, one causal block per run
    that counts up by 1 (see `tunery.data.packing`). Padding gets position ids 0, 1, 2, ...,
    which makes it a segment of its own that no real token attends to. An attention mask here
    would switch that detection off and let packed examples see each other.

    Labels are IGNORE_INDEX on padding in both modes, so padding never adds to the loss.
    """

    def __init__(self, pad_token_id: int, *, packed: bool, pad_to_multiple_of: int | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.packed = packed
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[Any]) -> dict[str, torch.Tensor]:
        """The batch tensors, each of shape (len(features), padded length), dtype int64."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        rows = [f if isinstance(f, Mapping) else vars(f) for f in features]
        for row in rows:
            if len(row["labels"]) != len(row["input_ids"]):
                raise ValueError("a feature's labels and input_ids differ in length")
            if self.packed and len(row["position_ids"]) != len(row["input_ids"]):
                raise ValueError("a feature's position_ids and input_ids differ in length")
        width = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        input_ids, labels, extra = [], [], []
        for row in rows:
            pad = width - len(row["input_ids"])
            input_ids.append(list(row["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(row["labels"]) + [IGNORE_INDEX] * pad)
            if self.packed:
                extra.append(list(row["position_ids"]) + list(range(pad)))
            else:
                extra.append([1] * len(row["input_ids"]) + [0] * pad)

        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        batch["position_ids" if self.packed else "attention_mask"] = torch.tensor(extra, dtype=torch.long)
        return batch
