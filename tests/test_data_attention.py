"""Packed examples do not attend to each other: proven on a real (tiny, random) Llama.

Each example's logits inside a packed row must equal its logits when run alone. The control
(contiguous position ids, i.e. a plain causal mask over the whole row) shows the comparison
is sharp enough to catch cross-example attention.
"""

from __future__ import annotations

import pytest
import torch

from tunery.data import Collator, Sequence, pack, tokenize_rows

TOL = 1e-4


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation=request.param, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def examples(tokenizer):
    rows = [
        {"prompt": "Item: the red cat.\nAnimal:", "completion": " cat"},
        {"prompt": "Q: What is two plus two, written as a word?\nA:", "completion": " four"},
        {"prompt": "Colour of the sky:", "completion": " blue, on a clear day"},
    ]
    return tokenize_rows(rows, "prompt_completion", tokenizer, max_length=64)


def run(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def alone(model, example) -> torch.Tensor:
    return run(model, {"input_ids": torch.tensor([example.input_ids])})[0]


def spans(seq: Sequence) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(seq.position_ids) if p == 0] + [len(seq)]
    return list(zip(starts, starts[1:], strict=False))


def owner(examples, ids: list[int]):
    [match] = [e for e in examples if e.input_ids == ids]
    return match


def test_packed_logits_match_separate_runs(model, examples):
    total = sum(len(e.input_ids) for e in examples)
    [seq] = pack(examples, total)
    assert len(spans(seq)) == 3
    logits = run(model, Collator(0, packed=True)([seq]))[0]
    for a, b in spans(seq):
        expected = alone(model, owner(examples, seq.input_ids[a:b]))
        torch.testing.assert_close(logits[a:b], expected, atol=TOL, rtol=0)


def test_a_plain_causal_mask_over_the_packed_row_would_leak(model, examples):
    total = sum(len(e.input_ids) for e in examples)
    [seq] = pack(examples, total)
    contiguous = {"input_ids": seq.input_ids, "labels": seq.labels, "position_ids": list(range(total))}
    logits = run(model, Collator(0, packed=True)([contiguous]))[0]
    (a0, b0), (a1, b1) = spans(seq)[:2]
    # The first example sees only itself either way; the second sees the first under a plain mask.
    torch.testing.assert_close(
        logits[a0:b0], alone(model, owner(examples, seq.input_ids[a0:b0])), atol=TOL, rtol=0
    )
    second = alone(model, owner(examples, seq.input_ids[a1:b1]))
    assert (logits[a1:b1] - second).abs().max() > 100 * TOL


def test_padded_batch_of_packed_rows_matches_separate_runs(model, examples):
    # Two rows of different lengths: the short one is padded, its padding is a segment of its own.
    rows = pack(examples, max(len(e.input_ids) for e in examples) + 2)
    assert len(rows) >= 2 and len({len(r) for r in rows}) > 1
    batch = Collator(0, packed=True, pad_to_multiple_of=8)(rows)
    logits = run(model, batch)
    for r, seq in enumerate(rows):
        for a, b in spans(seq):
            expected = alone(model, owner(examples, seq.input_ids[a:b]))
            torch.testing.assert_close(logits[r, a:b], expected, atol=TOL, rtol=0)


def test_packed_loss_equals_the_loss_of_separate_rows(model, tokenizer):
    # Every token labelled, so the first token of each example would count if pack() left it labelled.
    rows = [{"text": "The red cat sat."}, {"text": "Two plus two is four."}, {"text": "The sky is blue."}]
    examples = tokenize_rows(rows, "text", tokenizer, max_length=64)
    total = sum(len(e.input_ids) for e in examples)
    with torch.no_grad():
        packed = model(**Collator(0, packed=True)(pack(examples, total)), use_cache=False).loss
        loss_sum = count = 0.0
        for e in examples:
            # transformers' loss is a mean over the labelled tokens after the shift by one.
            n = sum(1 for lab in e.labels[1:] if lab != -100)
            batch = {"input_ids": torch.tensor([e.input_ids]), "labels": torch.tensor([e.labels])}
            loss_sum += float(model(**batch, use_cache=False).loss) * n
            count += n
    assert float(packed) == pytest.approx(loss_sum / count, abs=TOL)
