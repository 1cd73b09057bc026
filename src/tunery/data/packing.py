"""Arrange tokenized examples into the sequences a model trains on.

Three layouts:

* `unpacked`: one example per sequence (batches are padded to their longest row);
* `pack`: whole examples bin-packed into sequences of at most ``chunk_size`` tokens. Position
  ids restart at 0 at each example, which is how the model keeps examples apart: with no
  attention mask, transformers (``masking_utils.find_packed_sequence_indices``) reads every
  place the position ids do not step by +1 as the start of a new sequence and builds a
  block-diagonal causal mask (sdpa, eager), and flash-attention 2 uses the same ids for its
  variable-length kernel. The result trains exactly as if the examples were separate rows;
* `wrap`: every example concatenated in order and cut at exactly ``chunk_size`` tokens, with
  one run of position ids per chunk, so an example attends to the ones before it in its chunk
  (the classic "group texts" recipe, constant-length sequences, no padding).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable
from dataclasses import dataclass

from tunery.data.tokenize import IGNORE_INDEX, Example


@dataclass
class Sequence:
    """One training row: token ids, labels (IGNORE_INDEX: no loss) and position ids."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackingStats:
    """How well a layout uses its sequences.

    ``fill`` is tokens / (sequences * chunk_size): 1.0 means no room left in any sequence.
    """

    sequences: int
    tokens: int
    labelled_tokens: int
    fill: float


def unpacked(examples: Iterable[Example]) -> list[Sequence]:
    """One Sequence per example, in order, with position ids 0..n-1."""
    return [Sequence(list(e.input_ids), list(e.labels), list(range(len(e.input_ids)))) for e in examples]


def pack(examples: list[Example], chunk_size: int, *, seed: int | None = None) -> list[Sequence]:
    """Bin-pack whole examples into Sequences of at most ``chunk_size`` tokens.

    Every token of every example appears exactly once, and an example is never split: it sits
    contiguously in one Sequence, where its position ids run 0..len-1. The first label of each
    example is IGNORE_INDEX: the loss shifts labels left, so that label would otherwise be
    predicted from the previous example's last token (in a row of its own it is never
    predicted at all, so this keeps the loss identical to unpacked training).

    The packing is best-fit decreasing (longest example first, into the fullest sequence that
    has room), deterministic for given inputs. Sequences come out in the order they were
    opened, or shuffled with ``random.Random(seed)`` when ``seed`` is given.

    Raises ValueError if an example is longer than ``chunk_size`` (truncate first).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    lengths = [len(e.input_ids) for e in examples]
    for i, n in enumerate(lengths):
        if n > chunk_size:
            raise ValueError(
                f"example {i} has {n} tokens, more than chunk_size={chunk_size}; truncate it first"
            )

    bins: list[list[int]] = []  # example indices in each sequence
    # (room left, bin index), sorted: bisect finds the tightest bin with enough room in log time.
    room: list[tuple[int, int]] = []
    # Stable sort on length: ties keep input order, which keeps the result deterministic.
    for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):
        slot = bisect.bisect_left(room, (lengths[i], -1))
        if slot == len(room):
            bins.append([i])
            bisect.insort(room, (chunk_size - lengths[i], len(bins) - 1))
        else:
            left, b = room.pop(slot)
            bins[b].append(i)
            bisect.insort(room, (left - lengths[i], b))

    sequences = [_join([examples[i] for i in members]) for members in bins]
    if seed is not None:
        random.Random(seed).shuffle(sequences)
    return sequences


def _join(members: list[Example]) -> Sequence:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in members:
        ids += e.input_ids
        if e.labels:
            labels += [IGNORE_INDEX, *e.labels[1:]]
        positions += range(len(e.input_ids))
    return Sequence(ids, labels, positions)


def wrap(examples: Iterable[Example], chunk_size: int) -> list[Sequence]:
    """Concatenate all examples in order and cut the stream every ``chunk_size`` tokens.

    Every Sequence has exactly ``chunk_size`` tokens except possibly the last, which holds
    the remainder. Position ids run 0..len-1 in each Sequence, so examples in a chunk attend
    to the ones before them; labels are kept as they are.

    A chunk with no labelled token (possible at the tail, or when long prompts are masked)
    would add nothing to the loss but a division by zero, so it is dropped; every other token
    appears exactly once, in order.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        ids += e.input_ids
        labels += e.labels
    sequences = []
    for start in range(0, len(ids), chunk_size):
        chunk_labels = labels[start : start + chunk_size]
        if all(label == IGNORE_INDEX for label in chunk_labels):
            continue
        chunk_ids = ids[start : start + chunk_size]
        sequences.append(Sequence(chunk_ids, chunk_labels, list(range(len(chunk_ids)))))
    return sequences


def packing_stats(sequences: list[Sequence], chunk_size: int) -> PackingStats:
    """Counts of a layout; ``fill`` is relative to ``chunk_size`` (0.0 for no sequences)."""
    tokens = sum(len(s.input_ids) for s in sequences)
    labelled = sum(1 for s in sequences for label in s.labels if label != IGNORE_INDEX)
    fill = tokens / (len(sequences) * chunk_size) if sequences else 0.0
    return PackingStats(sequences=len(sequences), tokens=tokens, labelled_tokens=labelled, fill=fill)


def padding_fraction(sequences: list[Sequence], micro_batch_size: int) -> float:
    """The fraction of padding among all tokens the model would process if ``sequences`` were
    batched in order, ``micro_batch_size`` at a time, each batch padded to its longest row.

    0.0 for no sequences; the last batch may be smaller than ``micro_batch_size``.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    real = padded = 0
    for start in range(0, len(sequences), micro_batch_size):
        lengths = [len(s.input_ids) for s in sequences[start : start + micro_batch_size]]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
    return (padded - real) / padded if padded else 0.0
