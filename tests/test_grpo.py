"""method=grpo on the tiny random Llama: TRL's GRPOTrainer with a grader as the reward, through
tunery's recipe (data check, memory check, adapter, callbacks, checkpoints, events, manifest) and
the CLI. The tiny model's answers are noise, so these tests check the mechanism (rewards reach the
events, the adapter moves, failures are reported, resume continues); that GRPO raises a held-out
score is benchmarks/rl_quality.py's job, on SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import write_jsonl
from tunery.errors import DataError, SpecError, TuneryError
from tunery.train.events import read_events
from tunery.train.recipe import train

VOWELS = {"type": "python", "name": "vowels",
          "source": "def grade(sample, item):\n    t = sample['output_text']\n"
                    "    return sum(c in 'aeiou' for c in t) / max(1, len(t))\n"}
HAS_N = {"type": "string_check", "name": "has_n", "input": "{{ sample.output_text }}",
         "reference": "{{ item.n }}", "operation": "like"}
MULTI = {"type": "multi", "name": "total", "graders": {"vowels": VOWELS, "has_n": HAS_N},
         "calculate_output": "0.9 * vowels + 0.1 * has_n"}
FAST = {"method": "grpo", "num_generations": 4, "train_batch_size": 2, "micro_batch_size": 4,
        "max_completion_length": 12, "learning_rate": 2e-2, "run_validation": False, "save_steps": 1000,
        "logging_steps": 1, "num_train_epochs": 1}


def prompts(n: int = 8) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": f"Spell the number {i}."}], "n": str(i)} for i in range(n)]


@pytest.fixture
def rft(tmp_path):
    return write_jsonl(tmp_path / "rft.jsonl", prompts())


def test_grpo_trains_on_a_multi_grader_and_reports_its_scores(tmp_path, rft, tiny_model_dir):
    events = tmp_path / "events.jsonl"
    result = train({"train_data": str(rft), "grader": MULTI, **FAST}, base=str(tiny_model_dir),
                   output_dir=tmp_path / "run", progress=False, events=events)
    steps = [e for e in read_events(events) if e["type"] == "step"]
    assert len(steps) == 4  # 8 prompts, 2 a step
    for step in steps:
        assert 0.0 <= step["reward_mean"] <= 1.0 and step["reward_std"] >= 0.0
        assert 0.0 <= step["no_spread_share"] <= 1.0 and 1 <= step["completion_length"] <= 12
        assert 0.0 <= step["grader_vowels"] <= 1.0 and step["grader_has_n"] in (0.0, 0.5, 1.0) or \
            0.0 <= step["grader_has_n"] <= 1.0
        assert step["reward_mean"] == pytest.approx(0.9 * step["grader_vowels"] + 0.1 * step["grader_has_n"],
                                                    abs=1e-5)
        assert step["grader_failed_share"] == 0.0 and step["tokens_per_second"] > 0
    metrics = result.manifest["metrics"]
    assert metrics["steps"] == 4 and metrics["reward_mean"] == steps[-1]["reward_mean"]
    assert result.manifest["method"] == "grpo" and json.loads(result.manifest["inputs"]["grader"]) == MULTI
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    moved = [k for k, v in adapter.items() if "lora_B" in k and v.abs().max() > 0]
    assert moved, "no LoRA B matrix left its zero start: nothing was trained"
    # GRPO samples its answers without dropout, so by default it trains without it (plain LoRA too).
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    resolved = result.manifest["resolved_inputs"]
    assert resolved["lora_dropout"] == 0.0 and resolved["loraplus_lr_ratio"] == 1.0


def test_lora_dropout_is_off_by_default_for_every_method_and_a_given_one_wins():
    from tunery.spec import TrainingInputs

    grpo = {"train_data": "d.jsonl", "method": "grpo", "grader": json.dumps(MULTI)}
    assert TrainingInputs(**grpo).lora_dropout == 0.0
    assert TrainingInputs(train_data="d.jsonl").lora_dropout == 0.0
    assert TrainingInputs(train_data="d.jsonl", method="dpo").lora_dropout == 0.0
    assert TrainingInputs(**grpo, lora_dropout=0.05).lora_dropout == 0.05  # Replicate's trainer's value, when given
    assert TrainingInputs(train_data="d.jsonl", lora_dropout=0.05).model_dump()["lora_dropout"] == 0.05


def test_a_failing_grader_scores_zero_and_the_training_goes_on(tmp_path, rft, tiny_model_dir):
    """A python grader that raises on some rows, and one that runs out of time on others: those
    answers score 0, warnings name the grader and the reason, the training finishes."""
    flaky = {"type": "python", "name": "flaky",
             "source": "def grade(sample, item):\n    n = int(item['n'])\n"
                       "    if n % 4 == 1:\n        raise ValueError('no digits in ' + item['n'])\n"
                       "    if n % 4 == 2:\n        while True:\n            pass\n    return 0.5\n"}
    events = tmp_path / "events.jsonl"
    result = train({"train_data": str(rft), "grader": flaky, **FAST}, base=str(tiny_model_dir),
                   output_dir=tmp_path / "run", progress=False, events=events, settings=_quick_graders())
    warnings = [e["message"] for e in read_events(events) if e["type"] == "warning"]
    assert any("scored 0: grader: python grader ValueError: no digits in" in w for w in warnings), warnings
    assert any("scored 0: grader: python grader used more than its 1 s of CPU time" in w for w in warnings), warnings
    steps = [e for e in read_events(events) if e["type"] == "step"]
    assert result.manifest["metrics"]["steps"] == 4
    assert max(s["grader_failed_share"] for s in steps) > 0


def _quick_graders():
    from tunery.settings import Settings

    return Settings(grader_seconds=1)


def test_grpo_resumes_from_its_checkpoint(tmp_path, rft, tiny_model_dir):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    spec = {"train_data": str(rft), "grader": VOWELS, **FAST, "save_steps": 1}
    with pytest.raises(KeyboardInterrupt):
        train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "run", progress=False, callbacks=[StopAt()])
    events = tmp_path / "events.jsonl"
    resumed = train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "run", progress=False, resume=True,
                    events=events)
    assert resumed.manifest["metrics"]["steps"] == 4
    logs = [e["message"] for e in read_events(events) if e["type"] == "log"]
    assert any("resuming from" in m and m.endswith("checkpoint-1") for m in logs), logs  # step 2 stopped before its save
    assert [h["step"] for h in resumed.manifest["metrics"]["history"] if "loss" in h] == [1, 2, 3, 4]


def test_bad_rows_and_graders_fail_before_a_model_loads(tmp_path, rft, qa_rows, tiny_model_dir):
    missing = write_jsonl(tmp_path / "missing.jsonl", [prompts(1)[0], {"messages": prompts(1)[0]["messages"]},
                                                       {**prompts(1)[0], "n": 3}])
    with pytest.raises(DataError) as exc:
        train({"train_data": str(missing), "grader": MULTI, **FAST}, base="no-such-base", progress=False,
              output_dir=tmp_path / "a")
    assert [e.line for e in exc.value.errors] == [2]
    assert "grader.graders.has_n.reference reads {{ item.n }}, but item has no field 'n'" in str(exc.value)
    broken = {**VOWELS, "source": "def grade(sample, item):\n    return (\n"}
    with pytest.raises(SpecError, match=r"grader\.source: python grader: does not compile: line 2"):
        train({"train_data": str(rft), "grader": broken, **FAST}, base="no-such-base", progress=False,
              output_dir=tmp_path / "b")
    sft_file = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    with pytest.raises(TuneryError, match="method=grpo trains on prompts"):
        train({"train_data": str(sft_file), "grader": VOWELS, **FAST}, base="no-such-base", progress=False,
              output_dir=tmp_path / "c")
    with pytest.raises(TuneryError, match="prompts without answers .* method=sft trains on chats"):
        train({"train_data": str(rft)}, base="no-such-base", progress=False, output_dir=tmp_path / "d")
    with pytest.raises(SpecError, match="method=grpo needs a grader"):
        train({"train_data": str(rft), **FAST}, base="no-such-base", progress=False, output_dir=tmp_path / "e")


def test_rft_rows_are_checked_line_by_line(tmp_path):
    from tunery.data import read_jsonl

    rows = [prompts(1)[0],
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": 3}], "n": "1"},
            {"messages": [], "n": "1"}]
    with pytest.raises(DataError) as exc:
        read_jsonl(write_jsonl(tmp_path / "bad.jsonl", rows))
    text = str(exc.value)
    assert "bad.jsonl:2: messages: ends with an assistant message, but the file holds prompts" in text
    assert "bad.jsonl:3: messages[0].content" in text
    assert sorted({e.line for e in exc.value.errors}) == [2, 3, 4]


def test_cli_trains_grpo_with_a_grader_file(tmp_path, rft, tiny_model_dir):
    grader = tmp_path / "grader.json"
    grader.write_text(json.dumps({"grader": VOWELS}))
    cmd = [sys.executable, "-m", "tunery.cli", "train", "--train-data", str(rft), "--method", "grpo",
           "--grader", str(grader), "--num-generations", "4", "--train-batch-size", "2", "--micro-batch-size", "4",
           "--max-completion-length", "8", "--max-steps", "2", "--no-run-validation", "--base", str(tiny_model_dir),
           "-o", str(tmp_path / "run"), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reward=" in done.stderr and "steps=2" in done.stderr
    bad = subprocess.run(cmd[:-3] + ["--grader", str(tmp_path / "absent.json"), "-o", str(tmp_path / "r2")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--grader" in bad.stderr and "absent.json" in bad.stderr


def test_eval_on_rft_prompts_reports_the_graders_scores(tmp_path, rft, tiny_model_dir):
    """After training (test_data) and with `tunery eval`: the grader's mean score per column, each
    named grader's, base against tuned; the run's own grader by default."""
    held_out = write_jsonl(tmp_path / "held_out.jsonl", prompts(12)[8:])
    result = train({"train_data": str(rft), "grader": MULTI, **FAST, "max_steps": 1}, base=str(tiny_model_dir),
                   output_dir=tmp_path / "run", progress=False, test_data=held_out)
    report = result.report
    assert report["format"] == "rft" and report["columns"] == ["base", "tuned"] and report["rows"] == 4
    for column in ("base", "tuned"):
        m = report["metrics"][column]
        assert 0.0 <= m["grader_score"] <= 1.0 and m["grader_failed"] == 0.0
        assert m["grader_score"] == pytest.approx(0.9 * m["grader_vowels"] + 0.1 * m["grader_has_n"], abs=1e-6)
    done = subprocess.run([sys.executable, "-m", "tunery.cli", "eval", "-t", str(held_out), "--weights",
                           str(tmp_path / "run"), "--compare", "--json", "--max-new-tokens", "12"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    cli = json.loads(done.stdout)
    assert cli["grader"] == "total" and set(cli["metrics"]) == {"base", "tuned"}
    assert cli["metrics"]["tuned"]["grader_score"] == pytest.approx(report["metrics"]["tuned"]["grader_score"])
    grader = tmp_path / "exact.json"
    grader.write_text(json.dumps(HAS_N))
    other = subprocess.run([sys.executable, "-m", "tunery.cli", "eval", "-t", str(held_out), "--base",
                            str(tiny_model_dir), "--grader", str(grader), "--json", "--max-new-tokens", "12"],
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 0, other.stderr[-2000:]
    assert json.loads(other.stdout)["grader"] == "has_n"
    none = subprocess.run([sys.executable, "-m", "tunery.cli", "eval", "-t", str(held_out), "--base",
                           str(tiny_model_dir)], capture_output=True, text=True, timeout=600)
    assert none.returncode == 2 and "pass --grader grader.json" in none.stderr


@pytest.mark.parametrize("peft_method", ["qlora", "full"])
def test_grpo_with_other_peft_methods(tmp_path, rft, tiny_model_dir, peft_method):
    result = train({"train_data": str(rft), "grader": VOWELS, **FAST, "max_steps": 2, "peft_method": peft_method},
                   base=str(tiny_model_dir), output_dir=tmp_path / "run", progress=False)
    metrics = result.manifest["metrics"]
    assert metrics["steps"] == 2 and 0.0 <= metrics["reward_mean"] <= 1.0
    assert (result.run_dir / ("model" if peft_method == "full" else "adapter")).is_dir()


def test_a_judge_in_training_is_refused_before_a_model_loads(tmp_path, rft):
    judge = {"type": "score_model", "name": "judge", "model": "tunery/smollm2-135m",
             "input": [{"role": "user", "content": "Rate: {{ sample.output_text }}"}]}
    grader = {"type": "multi", "name": "m", "calculate_output": "j", "graders": {"j": judge}}
    with pytest.raises(SpecError, match=r"grader\.graders\.j\.type: a score_model grader judges through"):
        train({"train_data": str(rft), "grader": grader, **FAST}, base="no-such-base", progress=False,
              output_dir=tmp_path / "r")


def test_engine_rollouts_are_the_tokens_generate_picks(tiny_model_dir):
    """With top_k=1 sampling is the argmax: tunery's engine (all prompts in one continuous batch,
    left-padded) must give each prompt the very tokens transformers' generate gives it alone, eos
    included, and stop at max_new_tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.infer.embedded import eos_ids
    from tunery.train.grpo import engine_rollouts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.train()  # as the trainer leaves it; the engine samples in eval mode and restores it
    prompts = [tokenizer(t).input_ids for t in ("Spell 1", "Count the vowels in this sentence, please", "a b")]
    got = engine_rollouts(model, tokenizer, prompts, max_new_tokens=9, temperature=0.7, top_p=1.0, top_k=1)
    assert model.training
    model.eval()
    eos = eos_ids(model, tokenizer)
    for ids, answer in zip(prompts, got, strict=True):
        out = model.generate(torch.tensor([ids]), max_new_tokens=9, do_sample=False,
                             eos_token_id=sorted(eos), pad_token_id=tokenizer.eos_token_id)[0, len(ids):]
        assert answer == out.tolist()[:len(answer)] and 1 <= len(answer) <= 9
        assert len(answer) == 9 or answer[-1] in eos


@pytest.mark.parametrize("engine", ["tunery", "transformers"])
def test_grpo_samples_with_either_rollout_engine_repeatably(tmp_path, rft, tiny_model_dir, engine, monkeypatch):
    """Both rollout engines train, each sampling the answers itself (the embedded engine once a
    step, TRL's generate otherwise); with one seed, two runs sample the same answers (same rewards)."""
    import tunery.train.grpo as grpo

    calls = []
    sampled_by_engine = grpo.engine_rollouts
    monkeypatch.setattr(grpo, "engine_rollouts", lambda *a, **k: calls.append(len(a[2])) or sampled_by_engine(*a, **k))
    rewards = []
    for run in ("a", "b"):
        events = tmp_path / f"{run}.jsonl"
        train({"train_data": str(rft), "grader": MULTI, **FAST, "rollout_engine": engine, "seed": 7},
              base=str(tiny_model_dir), output_dir=tmp_path / run, progress=False, events=events)
        rewards.append([e["reward_mean"] for e in read_events(events) if e["type"] == "step"])
    assert len(rewards[0]) == 4 and rewards[0] == rewards[1]
    assert calls == ([2 * 4] * 8 if engine == "tunery" else [])  # 2 prompts × 4 answers, 4 steps, 2 runs


def test_grpo_keeps_the_checkpoint_of_its_best_validation_reward(tmp_path, tiny_model_dir):
    """With a validation set GRPO's evaluations score the graders on the held-out prompts, and the
    run ends with the weights of the highest validation reward (not the lowest loss)."""
    data = write_jsonl(tmp_path / "rft.jsonl", prompts(12))
    events = tmp_path / "events.jsonl"
    result = train({"train_data": str(data), "grader": VOWELS, **FAST, "run_validation": True,
                    "num_validation_samples": 4, "eval_steps": 1, "num_generations_eval": 2},
                   base=str(tiny_model_dir), output_dir=tmp_path / "run", progress=False, events=events)
    vals = [(e["step"], e["val_reward_mean"]) for e in read_events(events) if e["type"] == "validation"][:-1]
    assert [s for s, _ in vals] == [1, 2, 3, 4]
    best = max(v for _, v in vals)
    first_best = next(s for s, v in vals if v == best)
    kept = result.manifest["metrics"]["kept_checkpoint"]
    assert kept["metric"] == "reward" and kept["value"] == pytest.approx(best) and kept["step"] == first_best
    logs = [e["message"] for e in read_events(events) if e["type"] == "log"]
    assert any(m.startswith("kept ") and "validation reward" in m for m in logs), logs
