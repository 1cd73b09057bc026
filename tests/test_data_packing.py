"""pack / wrap / unpacked / Collator: property tests on random examples."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import find_packed_sequence_indices

from tunery.data import (
    IGNORE_INDEX,
    Collator,
    Example,
    Sequence,
    pack,
    packing_stats,
    padding_fraction,
    unpacked,
    wrap,
)

# Per test, not a global profile: other test files keep their own hypothesis settings.
fast = settings(max_examples=120, deadline=None)


@st.composite
def examples_and_chunk(draw, min_examples: int = 0):
    """A chunk size and examples no longer than it. Token ids encode (example, position), so a
    token that moved, vanished or was duplicated is detectable."""
    chunk = draw(st.integers(1, 40))
    lengths = draw(st.lists(st.integers(1, chunk), min_size=min_examples, max_size=25))
    examples = []
    for e, n in enumerate(lengths):
        ids = [1000 * (e + 1) + k for k in range(n)]
        mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        examples.append(Example(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]))
    return examples, chunk


def segments(seq: Sequence) -> list[tuple[list[int], list[int]]]:
    """Split a packed sequence where its position ids restart at 0: (ids, labels) per segment."""
    starts = [i for i, p in enumerate(seq.position_ids) if p == 0] + [len(seq)]
    return [(seq.input_ids[a:b], seq.labels[a:b]) for a, b in zip(starts, starts[1:], strict=False)]


@fast
@given(examples_and_chunk())
def test_pack_keeps_every_example_whole_exactly_once(case):
    examples, chunk = case
    sequences = pack(examples, chunk)
    found = [seg for seq in sequences for seg in segments(seq)]
    assert Counter(tuple(ids) for ids, _ in found) == Counter(tuple(e.input_ids) for e in examples)
    by_ids = {tuple(e.input_ids): e for e in examples}
    for ids, labels in found:
        # The first label of each example is dropped: it would be predicted from the previous example.
        assert labels == [IGNORE_INDEX] + by_ids[tuple(ids)].labels[1:]
    for seq in sequences:
        assert 0 < len(seq) <= chunk
        assert len(seq.labels) == len(seq.position_ids) == len(seq)
        for ids, _ in segments(seq):
            # Position ids count 0..n-1 inside each example: ids encode their own position.
            assert [t % 1000 for t in ids] == list(range(len(ids)))
        pos = seq.position_ids
        assert all(pos[i + 1] in (0, pos[i] + 1) for i in range(len(pos) - 1))


@fast
@given(examples_and_chunk())
def test_pack_is_deterministic_and_seed_only_reorders(case):
    examples, chunk = case
    first = pack(examples, chunk)
    assert pack(examples, chunk) == first
    shuffled = pack(examples, chunk, seed=7)
    assert shuffled == pack(examples, chunk, seed=7)
    assert sorted(map(repr, shuffled)) == sorted(map(repr, first))


@fast
@given(examples_and_chunk(min_examples=1))
def test_pack_needs_no_more_sequences_than_a_lower_bound_allows(case):
    examples, chunk = case
    total = sum(len(e.input_ids) for e in examples)
    sequences = pack(examples, chunk)
    # Best-fit decreasing never leaves two sequences that could be merged.
    sizes = sorted(len(s) for s in sequences)
    assert len(sizes) < 2 or sizes[0] + sizes[1] > chunk
    assert len(sequences) >= -(-total // chunk)
    stats = packing_stats(sequences, chunk)
    assert stats.tokens == total and stats.sequences == len(sequences)
    assert stats.fill == pytest.approx(total / (len(sequences) * chunk))


def test_pack_rejects_an_example_longer_than_the_chunk():
    with pytest.raises(ValueError, match="example 1 has 5 tokens"):
        pack([Example([1], [1]), Example([1] * 5, [1] * 5)], 4)


def test_pack_small_case_by_hand():
    a, b, c = Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [-100, 5]), Example([6], [6])
    sequences = pack([a, b, c], 4)
    assert sequences == [
        Sequence([1, 2, 3, 6], [-100, 2, 3, -100], [0, 1, 2, 0]),
        Sequence([4, 5], [-100, 5], [0, 1]),
    ]


@fast
@given(examples_and_chunk())
def test_wrap_cuts_the_stream_at_exactly_chunk_size(case):
    examples, chunk = case
    stream = [t for e in examples for t in e.input_ids]
    stream_labels = [lab for e in examples for lab in e.labels]
    sequences = wrap(examples, chunk)
    for seq in sequences[:-1]:
        assert len(seq) == chunk
    kept = []
    for seq in sequences:
        assert seq.position_ids == list(range(len(seq)))
        assert any(lab != IGNORE_INDEX for lab in seq.labels)
        # Each sequence is one chunk-aligned slice of the stream, in order.
        k = stream.index(seq.input_ids[0])
        assert k % chunk == 0 and stream[k : k + chunk] == seq.input_ids
        assert stream_labels[k : k + chunk] == seq.labels
        kept.append(k)
    assert kept == sorted(kept)
    # A slice is missing only when it has no labelled token.
    for k in set(range(0, len(stream), chunk)) - set(kept):
        assert all(lab == IGNORE_INDEX for lab in stream_labels[k : k + chunk])


def test_wrap_by_hand_keeps_a_labelled_remainder_and_drops_an_unlabelled_one():
    a, b = Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [-100, 5])
    assert [s.input_ids for s in wrap([a, b], 2)] == [[1, 2], [3, 4], [5]]
    assert [s.input_ids for s in wrap([a, Example([4, 5], [5, -100])], 4)] == [[1, 2, 3, 4]]


@fast
@given(examples_and_chunk())
def test_unpacked_is_one_sequence_per_example(case):
    examples, _ = case
    sequences = unpacked(examples)
    assert [(s.input_ids, s.labels) for s in sequences] == [(e.input_ids, e.labels) for e in examples]
    assert all(s.position_ids == list(range(len(s))) for s in sequences)


def test_padding_fraction_by_hand():
    seqs = unpacked([Example([1] * n, [1] * n) for n in (4, 2, 3, 3, 1)])
    # batches (4, 2) -> 2 pads of 8; (3, 3) -> 0 of 6; (1) -> 0 of 1.
    assert padding_fraction(seqs, 2) == pytest.approx(2 / 15)
    assert padding_fraction(seqs, 1) == 0.0
    assert padding_fraction([], 4) == 0.0


@fast
@given(examples_and_chunk(min_examples=1), st.integers(1, 6), st.sampled_from([None, 1, 8]))
def test_unpacked_collator_pads_right_and_masks_padding(case, batch_size, multiple):
    examples, _ = case
    sequences = unpacked(examples)
    collate = Collator(pad_token_id=0, packed=False, pad_to_multiple_of=multiple)
    padded = real = 0
    for start in range(0, len(sequences), batch_size):
        rows = sequences[start : start + batch_size]
        batch = collate([vars(s) for s in rows])
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        width = max(len(s) for s in rows)
        if multiple:
            assert batch["input_ids"].shape[1] % multiple == 0
        else:
            assert batch["input_ids"].shape == (len(rows), width)
            padded += batch["attention_mask"].numel()
            real += int(batch["attention_mask"].sum())
        for r, seq in enumerate(rows):
            n = len(seq)
            assert batch["input_ids"][r, :n].tolist() == seq.input_ids
            assert batch["labels"][r, :n].tolist() == seq.labels
            assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
            assert set(batch["labels"][r, n:].tolist()) <= {IGNORE_INDEX}
            assert set(batch["input_ids"][r, n:].tolist()) <= {0}
    if not multiple:
        assert padding_fraction(sequences, batch_size) == pytest.approx((padded - real) / padded)


@fast
@given(examples_and_chunk(min_examples=1), st.integers(1, 4))
def test_packed_collator_gives_each_example_and_the_padding_its_own_segment(case, batch_size):
    examples, chunk = case
    sequences = pack(examples, chunk)
    collate = Collator(pad_token_id=2, packed=True)
    for start in range(0, len(sequences), batch_size):
        rows = sequences[start : start + batch_size]
        batch = collate(rows)  # Sequence objects work as features too
        assert set(batch) == {"input_ids", "labels", "position_ids"}
        width = batch["input_ids"].shape[1]
        # What transformers will see: the segment index of every position.
        found = find_packed_sequence_indices(batch["position_ids"])
        for r, seq in enumerate(rows):
            n, pad = len(seq), width - len(seq)
            assert batch["position_ids"][r].tolist() == seq.position_ids + list(range(pad))
            assert batch["labels"][r, n:].tolist() == [IGNORE_INDEX] * pad
            expected = []
            for k, (ids, _) in enumerate(segments(seq)):
                expected += [k] * len(ids)
            expected += [len(segments(seq))] * pad
            actual = found[r].tolist() if found is not None else [0] * width
            assert actual == expected


def test_collator_rejects_ragged_features_and_empty_batches():
    collate = Collator(0, packed=True)
    with pytest.raises(ValueError):
        collate([])
    with pytest.raises(ValueError, match="labels"):
        collate([{"input_ids": [1, 2], "labels": [1], "position_ids": [0, 1]}])
    with pytest.raises(ValueError, match="position_ids"):
        collate([{"input_ids": [1, 2], "labels": [1, 2], "position_ids": [0]}])
    batch = Collator(0, packed=False)([{"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].tolist() == [[1]]
