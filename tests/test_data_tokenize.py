"""tokenize_rows: which tokens carry a loss, for each format, with SmolLM2's real tokenizer."""

from __future__ import annotations

import copy

import pytest

from tunery.data import IGNORE_INDEX, prompt_ids, tokenize_rows
from tunery.data.tokenize import assistant_spans
from tunery.errors import TuneryError

SYSTEM = {"role": "system", "content": "You answer in one word."}
USER = {"role": "user", "content": "What animal says moo?"}
BOT = {"role": "assistant", "content": "A cow."}
USER2 = {"role": "user", "content": "And woof?"}
BOT2 = {"role": "assistant", "content": "A dog."}


def labelled_runs(example) -> list[list[int]]:
    """The maximal runs of consecutive labelled tokens, as lists of ids."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(example.input_ids, example.labels, strict=True):
        on = label != IGNORE_INDEX
        if on:
            assert label == token, "a label is either the token itself or IGNORE_INDEX"
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = on
    return runs


def test_prompt_is_masked_and_completion_plus_eos_labelled(tokenizer, qa_rows):
    examples = tokenize_rows(qa_rows, "prompt_completion", tokenizer, max_length=512)
    assert len(examples) == len(qa_rows)
    for row, ex in zip(qa_rows, examples, strict=True):
        prompt = prompt_ids(tokenizer, row["prompt"])
        completion = tokenizer(row["completion"], add_special_tokens=False).input_ids
        assert ex.input_ids == prompt + completion + [tokenizer.eos_token_id]
        assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert ex.labels[len(prompt) :] == ex.input_ids[len(prompt) :]
        assert ex.labels[-1] == tokenizer.eos_token_id
        assert not ex.truncated and ex.labelled_tokens == len(completion) + 1


def test_prompt_and_completion_are_tokenized_separately(tokenizer):
    # "Animal:" + "cat" would merge across the boundary if tokenized as one string.
    [ex] = tokenize_rows(
        [{"prompt": "Animal", "completion": "s are"}], "prompt_completion", tokenizer, max_length=64
    )
    prompt = prompt_ids(tokenizer, "Animal")
    assert ex.input_ids[: len(prompt)] == prompt
    assert tokenizer.decode(ex.input_ids[len(prompt) :], skip_special_tokens=True) == "s are"


def test_train_on_inputs_labels_every_token(tokenizer, qa_rows):
    for fmt, rows in [("prompt_completion", qa_rows[:3]), ("messages", [{"messages": [SYSTEM, USER, BOT]}])]:
        for ex in tokenize_rows(rows, fmt, tokenizer, max_length=512, train_on_inputs=True):
            assert ex.labels == ex.input_ids


def test_text_rows_are_labelled_whole_and_end_with_eos(tokenizer):
    [ex] = tokenize_rows([{"text": "The cat sat on the mat."}], "text", tokenizer, max_length=64)
    expected = tokenizer("The cat sat on the mat.", add_special_tokens=True).input_ids + [
        tokenizer.eos_token_id
    ]
    assert ex.input_ids == expected
    assert ex.labels == expected


def test_chat_labels_only_assistant_content_and_end_of_turn(tokenizer):
    [ex] = tokenize_rows([{"messages": [SYSTEM, USER, BOT]}], "messages", tokenizer, max_length=512)
    runs = labelled_runs(ex)
    assert [tokenizer.decode(run) for run in runs] == ["A cow.<|im_end|>"]
    masked = tokenizer.decode(
        [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE_INDEX]
    )
    assert SYSTEM["content"] in masked and USER["content"] in masked
    assert "A cow." not in masked
    # The template already ends the chat with <|im_end|> (the EOS): no second one is appended.
    assert ex.input_ids.count(tokenizer.eos_token_id) == 3


def test_multi_turn_chat_has_one_labelled_span_per_assistant_turn(tokenizer):
    [ex] = tokenize_rows(
        [{"messages": [SYSTEM, USER, BOT, USER2, BOT2]}], "messages", tokenizer, max_length=512
    )
    assert [tokenizer.decode(run) for run in labelled_runs(ex)] == ["A cow.<|im_end|>", "A dog.<|im_end|>"]
    full = tokenizer.apply_chat_template([SYSTEM, USER, BOT, USER2, BOT2], tokenize=False)
    assert tokenizer.decode(ex.input_ids) == full


def test_chat_that_opens_with_an_assistant_turn(tokenizer):
    # The template inserts a default system prompt, so an empty chat's generation prompt is not a prefix.
    [ex] = tokenize_rows([{"messages": [BOT, USER]}], "messages", tokenizer, max_length=512)
    assert [tokenizer.decode(run) for run in labelled_runs(ex)] == ["A cow.<|im_end|>"]


def test_assistant_spans_cover_content_and_end_of_turn(tokenizer):
    text, spans = assistant_spans(tokenizer, [USER, BOT, USER2, BOT2])
    assert [text[a:b] for a, b in spans] == ["A cow.<|im_end|>", "A dog.<|im_end|>"]


@pytest.fixture
def plain_template_tokenizer(tokenizer):
    """The same tokenizer with a template that has no end-of-turn token."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tok


def test_eos_is_appended_and_labelled_when_the_template_does_not_end_with_it(plain_template_tokenizer):
    tok = plain_template_tokenizer
    [ex] = tokenize_rows([{"messages": [USER, BOT, USER2, BOT2]}], "messages", tok, max_length=512)
    assert ex.input_ids[-1] == tok.eos_token_id
    assert ex.labels[-1] == tok.eos_token_id
    # The generation prompt's trailing space merges into the answer's first token ("ĠA"): a token
    # holding any answer character is labelled. The newline after the last turn is not.
    runs = [tok.decode(run) for run in labelled_runs(ex)]
    assert runs == [" A cow.", " A dog.", "<|im_end|>"]


def test_appended_eos_is_not_labelled_after_a_final_user_turn(plain_template_tokenizer):
    [ex] = tokenize_rows(
        [{"messages": [USER, BOT, USER2]}], "messages", plain_template_tokenizer, max_length=512
    )
    assert ex.input_ids[-1] == plain_template_tokenizer.eos_token_id
    assert ex.labels[-1] == IGNORE_INDEX


def test_chat_rows_need_a_chat_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(TuneryError, match="chat template"):
        tokenize_rows([{"messages": [USER, BOT]}], "messages", tok, max_length=64)


def test_truncation_keeps_the_head_and_is_flagged(tokenizer, qa_rows):
    full = tokenize_rows(qa_rows[:4], "prompt_completion", tokenizer, max_length=512)
    cut = tokenize_rows(qa_rows[:4], "prompt_completion", tokenizer, max_length=5)
    for whole, short in zip(full, cut, strict=True):
        assert short.truncated and len(short.input_ids) == 5
        assert short.input_ids == whole.input_ids[:5] and short.labels == whole.labels[:5]
        # A prompt longer than the limit leaves nothing to train on: visible to the caller.
        assert short.labelled_tokens == 0
    exact = tokenize_rows(qa_rows[:1], "prompt_completion", tokenizer, max_length=len(full[0].input_ids))
    assert not exact[0].truncated and exact[0].input_ids == full[0].input_ids

    long_chat = {"messages": [SYSTEM, USER, BOT, USER2, BOT2]}
    [ex] = tokenize_rows([long_chat], "messages", tokenizer, max_length=20)
    assert ex.truncated and len(ex.input_ids) == 20


def test_no_rows_no_examples_and_bad_limits(tokenizer):
    assert tokenize_rows([], "text", tokenizer, max_length=8) == []
    with pytest.raises(ValueError):
        tokenize_rows([{"text": "a"}], "text", tokenizer, max_length=0)


def test_assistant_turns_of_weight_0_are_not_labelled(tokenizer):
    chat = [SYSTEM, USER, {**BOT, "weight": 0}, USER2, {**BOT2, "weight": 1}]
    [ex] = tokenize_rows([{"messages": chat}], "messages", tokenizer, max_length=512)
    assert [tokenizer.decode(run) for run in labelled_runs(ex)] == ["A dog.<|im_end|>"]
    # The weight is for the loss mask only: the text is the chat's, as without weights.
    [plain] = tokenize_rows([{"messages": [SYSTEM, USER, BOT, USER2, BOT2]}], "messages", tokenizer, max_length=512)
    assert ex.input_ids == plain.input_ids
    [last_off] = tokenize_rows([{"messages": [USER, BOT, USER2, {**BOT2, "weight": 0}]}], "messages", tokenizer,
                               max_length=512)
    assert [tokenizer.decode(run) for run in labelled_runs(last_off)] == ["A cow.<|im_end|>"]


def test_weight_0_at_the_end_leaves_the_appended_eos_unlabelled(plain_template_tokenizer):
    tok = plain_template_tokenizer
    [ex] = tokenize_rows([{"messages": [USER, BOT, USER2, {**BOT2, "weight": 0}]}], "messages", tok, max_length=512)
    assert ex.input_ids[-1] == tok.eos_token_id and ex.labels[-1] == IGNORE_INDEX
    assert [tok.decode(run).strip() for run in labelled_runs(ex)] == ["A cow."]


def test_preference_pairs_label_only_the_compared_answers(tokenizer):
    from tunery.data import preference_examples

    row = {"input": {"messages": [SYSTEM, USER, BOT, USER2]},
           "preferred_output": [BOT2], "non_preferred_output": [{"role": "assistant", "content": "A cat."}]}
    [pair] = preference_examples([row], tokenizer, max_length=512)
    assert [tokenizer.decode(run) for run in labelled_runs(pair.preferred)] == ["A dog.<|im_end|>"]
    assert [tokenizer.decode(run) for run in labelled_runs(pair.non_preferred)] == ["A cat.<|im_end|>"]
    # The same prompt before each answer: the chat rendered up to the generation prompt.
    prompt = tokenizer.apply_chat_template([SYSTEM, USER, BOT, USER2], tokenize=False, add_generation_prompt=True)
    n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert pair.preferred.input_ids[:n] == pair.non_preferred.input_ids[:n]
    assert tokenizer.decode(pair.preferred.input_ids[:n]) == prompt
    assert all(label == IGNORE_INDEX for label in pair.preferred.labels[:n])
    with pytest.raises(ValueError, match="preference_examples"):
        tokenize_rows([row], "preference", tokenizer, max_length=512)
