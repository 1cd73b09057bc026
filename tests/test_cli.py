"""The `tunery` command end to end, as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import write_jsonl
from tunery.spec import REPLICATE_INPUTS, TrainingInputs


def tunery(*args, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tunery.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_train_flags_are_the_spec():
    help_text = tunery("train", "--help").stdout
    for name in TrainingInputs.model_fields:
        assert "--" + name.replace("_", "-") in help_text, name
    # Replicate's defaults, exactly, but for LoRA dropout: 0 (peft's, LLaMA-Factory's and unsloth's
    # default) trains 20-25 % faster at the same quality; Replicate's 0.05 is honoured when given.
    defaults = {k: TrainingInputs.model_fields[k].default for k in REPLICATE_INPUTS if k != "train_data"}
    assert defaults == {
        "num_train_epochs": 3, "train_batch_size": 4, "micro_batch_size": 4, "num_validation_samples": 50,
        "validation_data": None, "validation_batch_size": 1, "run_validation": True, "validation_prompt": None,
        "learning_rate": 1e-4, "pack_sequences": False, "wrap_packed_sequences": False, "chunk_size": 2048,
        "peft_method": "lora", "seed": 42, "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
    }


def test_train_three_steps_then_predict(tmp_path, qa_rows, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows)
    run_dir = tmp_path / "run"
    proc = tunery("train", "--base", tiny_model_dir, "--train-data", data, "--max-steps", 3,
                  "--num-validation-samples", 4, "--micro-batch-size", 2, "--events", "-", "-o", run_dir)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    types = [e["type"] for e in events]
    assert types[0] == "started" and types[-1] == "succeeded"
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    # stderr is a pipe here, not a terminal: plain progress lines instead of a bar (the first and the last step).
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train step ")]
    shown = [line.split()[2] for line in lines]
    assert shown[0] == "1/3" and shown[-1] == "3/3", proc.stderr  # a step past 5 s would add a line between
    assert all(" loss " in line and " tok/s " in line and " ETA " in line for line in lines)
    assert "padding=" in proc.stderr
    assert "gemm_4bit_forward" not in proc.stderr  # bitsandbytes' kernel-hub notice (CPUs with avx512_bf16)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["inputs"] == {"train_data": str(data), "max_steps": 3, "num_validation_samples": 4,
                                  "micro_batch_size": 2}

    out = tunery("predict", "--weights", run_dir, "--prompt", "Item: the red cat.\nAnimal:", "--temperature", 0,
                 "--max-new-tokens", 5)
    archive = tunery("predict", "--weights", run_dir / "training_output.zip", "--prompt",
                     "Item: the red cat.\nAnimal:", "--temperature", 0, "--max-new-tokens", 5)
    assert archive.stdout == out.stdout


def test_bad_file_is_reported_with_lines_and_nothing_trains(tmp_path, tiny_model_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}, "{oops", {"prompt": 3,
                                                                                           "completion": "c"}])
    proc = tunery("train", "--base", tiny_model_dir, "--train-data", bad, "-o", tmp_path / "r", check=False)
    assert proc.returncode == 2
    assert "bad.jsonl:2" in proc.stderr and "bad.jsonl:3" in proc.stderr and "prompt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "adapter").exists()


def test_invalid_input_message(tmp_path):
    proc = tunery("train", "--train-data", "x.jsonl", "--train-batch-size", 6, check=False)
    assert proc.returncode == 2 and "micro_batch_size (4) must divide train_batch_size (6)" in proc.stderr


def test_unknown_base_lists_what_was_tried(tmp_path, qa_rows):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows)
    proc = tunery("train", "--base", "no-such-model", "--train-data", data, "--num-validation-samples", 2,
                  check=False)
    assert proc.returncode == 2
    line = [ln for ln in proc.stderr.splitlines() if "no-such-model" in ln]
    assert line and "not a registered name" in proc.stderr and "no local directory" in proc.stderr


def test_data_check(tmp_path, qa_rows, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows)
    proc = tunery("data", "check", data, "--base", tiny_model_dir, "--chunk-size", 64, "--json")
    r = json.loads(proc.stdout)
    assert r["rows"] == 24 and r["format"] == "prompt_completion"
    assert r["trained_tokens"] < r["tokens"]  # prompts are masked
    assert r["rows_truncated"] == 0 and 0 < r["packed_fill"] <= 1
    assert r["estimate"]["tokens_per_second"] > 0 and r["estimate"]["seconds"] > 0
    table = tunery("data", "check", data, "--base", tiny_model_dir, "--max-seq-length", 8, "--no-estimate")
    assert "rows truncated" in table.stdout and "24 (at 8 tokens)" in table.stdout


@pytest.mark.slow
def test_smollm2_finetunes_a_few_steps(tmp_path, qa_rows):
    """The real default base: GGUF → cached safetensors → LoRA for a few steps → loss goes down."""
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows * 2)
    run_dir = tmp_path / "run"
    tunery("train", "--train-data", data, "--max-steps", 6, "--learning-rate", 1e-3, "--train-batch-size", 8,
           "--micro-batch-size", 8, "--num-validation-samples", 8, "--eval-steps", 6, "-o", run_dir)
    m = json.loads((run_dir / "manifest.json").read_text())
    losses = [h["loss"] for h in m["metrics"]["history"] if "loss" in h]
    assert m["base"]["name"] == "smollm2-135m" and m["base"]["kind"] == "registry"
    assert losses[-1] < losses[0]
    assert m["metrics"]["val_loss"] is not None


def test_train_dpo_then_eval_the_preference_rate(tmp_path, tiny_model_dir):
    from test_dpo import preference_rows

    rows = preference_rows()
    prefs, held_out = write_jsonl(tmp_path / "prefs.jsonl", rows[:24]), write_jsonl(tmp_path / "held.jsonl", rows[24:])
    run_dir = tmp_path / "run"
    proc = tunery("train", "--method", "dpo", "--train-data", prefs, "--base", tiny_model_dir, "--max-steps", 3,
                  "--no-run-validation", "--learning-rate", 5e-3, "--test-data", held_out, "--events", "-",
                  "-o", run_dir)
    steps = [e for e in map(json.loads, proc.stdout.splitlines()) if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3] and all("reward_accuracy" in e for e in steps)
    assert " reward acc " in [ln for ln in proc.stderr.splitlines() if ln.startswith("train step 3/3")][0]
    assert "reward_accuracy=" in proc.stderr and "preference_rate" in proc.stderr  # the done line, the eval table
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["method"] == "dpo" and manifest["inputs"]["method"] == "dpo"

    report = json.loads(tunery("eval", "--weights", run_dir, "--test-data", held_out, "--compare", "--json").stdout)
    assert report["columns"] == ["base", "tuned"] and report["format"] == "preference"
    # The same numbers as right after training (up to the precision the two loads compute in).
    for col in ("base", "tuned"):
        after_training = manifest["eval"]["metrics"][col]
        assert report["metrics"][col]["preference_rate"] == after_training["preference_rate"]
        assert report["metrics"][col]["logp_margin"] == pytest.approx(after_training["logp_margin"], abs=0.02)
    from test_eval import rendered

    table = rendered(report)  # what `tunery eval` prints without --json
    assert "preference_rate" in table and "logp_margin" in table and "non-preferred" in table


def test_dpo_and_data_mismatches_are_one_line_errors(tmp_path, qa_rows, tiny_model_dir):
    from test_dpo import preference_rows

    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows()[:4])
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    sft = tunery("train", "--train-data", prefs, "--base", tiny_model_dir, "-o", tmp_path / "a", check=False)
    assert sft.returncode == 2 and "Traceback" not in sft.stderr
    assert f"{prefs} (train_data) has preference rows, which train with method=dpo" in sft.stderr
    dpo = tunery("train", "--method", "dpo", "--train-data", qa, "--base", tiny_model_dir, "-o", tmp_path / "b",
                 check=False)
    assert dpo.returncode == 2 and "has prompt_completion rows, but method=dpo trains on preference rows" in dpo.stderr
    packed = tunery("train", "--method", "dpo", "--train-data", prefs, "--pack-sequences", check=False)
    assert packed.returncode == 2 and "pack_sequences is not available with method=dpo" in packed.stderr
    check = json.loads(tunery("data", "check", prefs, "--base", tiny_model_dir, "--json").stdout)
    assert check["format"] == "preference" and check["rows"] == 4 and check["steps_per_epoch"] == 1
