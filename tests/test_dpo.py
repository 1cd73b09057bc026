"""method=dpo on the tiny random Llama: TRL's DPOTrainer raises the held-out preference rate, its
metrics reach the events and the manifest, resume and the other PEFT methods work, and a data or
input mismatch fails before a model loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from tunery.errors import SpecError, TuneryError
from tunery.train.events import read_events
from tunery.train.recipe import train

THINGS = ["sky", "grass", "sun", "snow", "coal", "blood", "sea", "lemon", "cherry", "leaf", "cloud", "night",
          "milk", "rose", "banana", "ocean", "tomato", "pumpkin", "violet", "ash", "ink", "carrot", "lime", "plum",
          "moss", "salt", "pearl", "rust", "gold", "smoke", "steel", "cream", "honey", "mint", "wine", "olive"]
COLOURS = ["blue", "green", "yellow", "white", "black", "red"]
# One token each in SmolLM2's vocabulary: the two answers of a row have the same length, so an untrained
# model's preference between them is a coin toss, not a bias for the shorter one.
KIND = ["lovely", "wonderful", "great", "nice", "pleasant", "charming", "beautiful", "splendid"]
UNKIND = ["awful", "terrible", "boring", "ugly", "nasty", "dreadful", "horrible", "dull"]


def preference_rows() -> list[dict]:
    """36 rows whose rule is clear: the preferred answer speaks kindly of the colour, the other not."""
    def answer(thing, colour, word):
        return [{"role": "assistant", "content": f"The {thing} is {colour} and it looks {word}."}]

    return [{"input": {"messages": [{"role": "user", "content": f"What colour is the {t}?"}]},
             "preferred_output": answer(t, COLOURS[i % 6], KIND[i % 8]),
             "non_preferred_output": answer(t, COLOURS[i % 6], UNKIND[(i * 3 + i // 8) % 8])}
            for i, t in enumerate(THINGS)]


@pytest.fixture
def prefs(tmp_path):
    rows = preference_rows()
    return write_jsonl(tmp_path / "prefs.jsonl", rows[:24]), write_jsonl(tmp_path / "held_out.jsonl", rows[24:])


# The tiny random model needs a high learning rate to move in 18 steps; LoRA+'s 16× on top of it overshoots
# (measured: reward accuracy falls back to 0.75 by the last step), so plain LoRA here.
FAST = {"method": "dpo", "run_validation": False, "save_steps": 1000, "logging_steps": 1, "learning_rate": 5e-3,
        "loraplus_lr_ratio": 1}


def run(tmp_path, name, data, tiny_model_dir, **inputs):
    spec = {"train_data": str(data), **FAST, **inputs}
    return train(spec, base=str(tiny_model_dir), output_dir=tmp_path / name, progress=False)


def test_dpo_raises_the_held_out_preference_rate(tmp_path, prefs, tiny_model_dir):
    train_file, held_out = prefs
    events_file = tmp_path / "events.jsonl"
    result = train({"train_data": str(train_file), **FAST, "run_validation": True,
                    "validation_data": str(held_out), "num_validation_samples": 4, "eval_steps": 9,
                    "validation_prompt": "What colour is the sky?"},
                   base=str(tiny_model_dir), output_dir=tmp_path / "run", progress=False, events=events_file,
                   test_data=held_out)
    base, tuned = result.report["metrics"]["base"], result.report["metrics"]["tuned"]
    # Measured: base 0.42 (5 of 12), tuned 1.00 (12 of 12); margins -0.12 → +2.2 nats.
    assert base["preference_rate"] <= 0.6
    assert tuned["preference_rate"] >= base["preference_rate"] + 0.3, (base, tuned)
    assert tuned["logp_margin"] > base["logp_margin"] + 1.0, (base, tuned)
    assert result.report["format"] == "preference" and result.report["rows"] == 12

    # TRL's metrics in our step and validation events, and in the manifest.
    events = read_events(events_file)
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 19))
    for key in ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logp_chosen",
                "logp_rejected"):
        assert all(isinstance(e[key], float) for e in steps), key
    # Measured 1.0 on the last steps; a CPU without bf16 computes in fp32 and may round differently.
    assert steps[-1]["reward_accuracy"] >= 0.75 and steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    assert all(e["tokens_per_second"] > 0 for e in steps)
    assert any(e["type"] == "sample" for e in events)
    validations = [e for e in events if e["type"] == "validation"]
    assert validations and all("val_reward_accuracy" in e and "val_reward_margin" in e for e in validations)
    m = result.manifest
    assert m["method"] == "dpo" and m["dpo_beta"] == 0.1 and m["resolved_inputs"]["method"] == "dpo"
    assert m["data"]["train_data"]["format"] == "preference"
    assert m["data_stats"]["train_rows"] == 24 and m["data_stats"]["sequences"] == 48
    assert m["metrics"]["reward_accuracy"] == steps[-1]["reward_accuracy"]
    assert m["metrics"]["val_reward_accuracy"] == validations[-1]["val_reward_accuracy"]
    assert m["metrics"]["real_tokens"] > m["metrics"]["trained_tokens"] > 0
    assert any("reward_accuracy" in h for h in m["metrics"]["history"])
    assert m["eval"]["metrics"]["tuned"]["preference_rate"] == tuned["preference_rate"]

    # The run is an ordinary LoRA run: one adapter (no copy of TRL's reference), and it predicts.
    assert sorted(p.name for p in (result.run_dir / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    from tunery.infer.generation import SamplingParams
    from tunery.infer.predict import stream
    from tunery.infer.weights import resolve_weights

    assert resolve_weights(result.run_dir).kind == "adapter"
    text = "".join(stream("What colour is the sky?", weights=str(result.run_dir),
                          params=SamplingParams(max_new_tokens=4, temperature=0)))
    assert isinstance(text, str)


def test_dpo_resume_equals_uninterrupted(tmp_path, prefs, tiny_model_dir):
    from test_train import StopAt

    train_file, _ = prefs
    spec = {"train_data": str(train_file), **FAST, "max_steps": 4, "save_steps": 2}
    straight = train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "crash", progress=False, callbacks=[StopAt(3)])
    assert (tmp_path / "crash" / "checkpoints" / "checkpoint-2").is_dir()
    resumed = train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "crash", progress=False, resume=True)
    a = load_file(str(straight.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    history = resumed.manifest["metrics"]["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4] and all("reward_accuracy" in h for h in history)


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_dpo_with_other_peft_methods(tmp_path, prefs, tiny_model_dir, method):
    train_file, held_out = prefs
    # Validation rows from the tail of train_data, as for SFT.
    result = train({"train_data": str(train_file), **FAST, "peft_method": method, "max_steps": 3,
                    "run_validation": True, "num_validation_samples": 4},
                   base=str(tiny_model_dir), output_dir=tmp_path / method, progress=False, test_data=held_out)
    assert (result.manifest["data_stats"]["train_rows"], result.manifest["data_stats"]["validation_rows"]) == (20, 4)
    history = [h for h in result.manifest["metrics"]["history"] if "loss" in h]
    assert len(history) == 3 and history[-1]["reward_margin"] > 0
    assert result.manifest["metrics"]["val_reward_margin"] > 0  # measured against the reference: it moved
    if method == "full":  # the reference log-probs were computed before the first step: no base column
        assert (result.run_dir / "model").is_dir() and list(result.report["metrics"]) == ["tuned"]
    else:
        weights = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
        assert all(w.dtype == torch.float32 for w in weights.values())  # fp32 adapter, as in SFT
        assert list(result.report["metrics"]) == ["base", "tuned"]


def test_method_and_data_format_must_agree_before_a_model_loads(tmp_path, prefs, qa_rows):
    train_file, _ = prefs
    chat = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    with pytest.raises(TuneryError) as info:
        train({"train_data": str(train_file)}, base="no-such-base", output_dir=tmp_path / "a", progress=False)
    assert str(info.value) == (f"{train_file} (train_data) has preference rows, which train with method=dpo; "
                               "method=sft trains on text, prompt/completion or chat rows")
    with pytest.raises(TuneryError, match=r"has prompt_completion rows, but method=dpo trains on preference rows"):
        train({"train_data": str(chat), "method": "dpo"}, base="no-such-base", output_dir=tmp_path / "b",
              progress=False)
    with pytest.raises(TuneryError, match=r"qa.jsonl \(validation_data\) has prompt_completion rows"):
        train({"train_data": str(train_file), "method": "dpo", "validation_data": str(chat)}, base="no-such-base",
              output_dir=tmp_path / "c", progress=False)
    events = read_events(tmp_path / "a" / "events.jsonl")
    assert [e["type"] for e in events] == ["started", "failed"]


def test_inputs_dpo_cannot_use():
    with pytest.raises(SpecError, match="pack_sequences is not available with method=dpo"):
        train({"train_data": "x.jsonl", "method": "dpo", "pack_sequences": True})
    with pytest.raises(SpecError, match="train_on_inputs is not available with method=dpo"):
        train({"train_data": "x.jsonl", "method": "dpo", "train_on_inputs": True})


def test_evaluate_scores_preference_rows_like_the_trainer(tmp_path, prefs, tiny_model_dir):
    """The preference rate counts rows whose preferred answer has the higher summed log-probability;
    checked against a direct computation with the model's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.data import read_jsonl
    from tunery.eval.evaluate import evaluate

    _, held_out = prefs
    report = evaluate(held_out, base=str(tiny_model_dir), output_dir=tmp_path / "eval", progress=False)
    assert report["columns"] == ["base"] and report["format"] == "preference"
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["metrics"] == report["metrics"]
    assert "non-preferred" in (tmp_path / "eval" / "eval.md").read_text()

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def logp(messages, answer):
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(messages + answer, tokenize=False).rstrip()  # ends at <|im_end|>
        p, ids = tok(prompt, add_special_tokens=False).input_ids, tok(full, add_special_tokens=False).input_ids
        assert ids[:len(p)] == p
        with torch.no_grad():
            out = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        return sum(out[i - 1, ids[i]].item() for i in range(len(p), len(ids)))

    rows = read_jsonl(held_out).rows
    margins = [logp(r["input"]["messages"], r["preferred_output"]) - logp(r["input"]["messages"],
                                                                           r["non_preferred_output"]) for r in rows]
    expected = sum(m > 0 for m in margins) / len(rows)
    assert report["metrics"]["base"]["preference_rate"] == pytest.approx(expected)
    assert report["metrics"]["base"]["logp_margin"] == pytest.approx(sum(margins) / len(rows), abs=1e-3)
