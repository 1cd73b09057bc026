"""Evaluation: metric functions against hand-computed values, reports on a tiny model, the
automatic end-of-training evaluation, and (slow) the real sample on SmolLM2."""

from __future__ import annotations

import io
import json

import pytest

from conftest import write_jsonl
from tunery.eval import metrics as M
from tunery.train.events import read_events
from tunery.train.recipe import train


def test_exact_match_ignores_surrounding_and_repeated_space():
    assert M.exact_match([" a  b ", "x"], ["a b", "y"]) == 0.5
    assert M.exact_match(["A b"], ["a b"]) == 0.0  # case matters for exact match


def test_label_accuracy_only_for_label_like_references():
    refs = ["positive", "negative", "positive", "negative"]
    assert M.is_label_like(refs)
    assert M.label_accuracy(["Positive.", "negative", "neutral", "NEGATIVE"], refs) == 0.75
    assert not M.is_label_like(["a long free text answer here", "another one"])
    assert "accuracy" not in M.generation_metrics(["x y z w"], ["one two three four"])
    assert M.generation_metrics(["negative", "positive", "positive", "negative"], refs)["accuracy"] == 0.5


def test_rouge_hand_computed():
    r = M.rouge(["the cat sat"], ["the cat sat on the mat"])
    # unigrams: 3 of 3 predicted are in the reference, 3 of 6 reference found: F1 = 2*1*0.5/1.5
    assert r["rouge1"] == pytest.approx(2 / 3)
    # bigrams: 2 of 2 predicted, 2 of 5 reference: F1 = 2*1*0.4/1.4
    assert r["rouge2"] == pytest.approx(0.8 / 1.4)
    assert r["rougeL"] == pytest.approx(2 / 3)
    assert M.rouge(["completely different"], ["the cat sat"])["rouge1"] == 0.0


def test_chrf_and_bleu_bounds():
    assert M.chrf(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert 0 < M.chrf(["the cat sat on a mat"], ["the cat sat on the mat"]) < 1
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        M.bleu(["a", "b"], ["a"])


@pytest.fixture
def split(tmp_path, qa_rows):
    return write_jsonl(tmp_path / "train.jsonl", qa_rows), write_jsonl(tmp_path / "test.jsonl", qa_rows[:6])


def test_training_with_test_data_evaluates_at_the_end(tmp_path, split, tiny_model_dir):
    train_file, test_file = split
    result = train({"train_data": str(train_file), "max_steps": 3, "run_validation": False, "learning_rate": 1e-2},
                   base=str(tiny_model_dir), output_dir=tmp_path / "run", progress=False, test_data=test_file)
    d = result.run_dir
    report = json.loads((d / "eval.json").read_text())
    assert report["columns"] == ["base", "tuned"] and report["rows"] == 6
    for col in ("base", "tuned"):
        m = report["metrics"][col]
        assert {"loss", "perplexity", "exact_match", "rouge1", "rouge2", "rougeL", "chrf", "bleu"} <= set(m)
        assert m["perplexity"] == pytest.approx(2.718281828 ** m["loss"], rel=1e-6)
    # the adapter moved the loss; base and tuned columns are really different models
    assert report["metrics"]["base"]["loss"] != pytest.approx(report["metrics"]["tuned"]["loss"], abs=1e-6)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["eval"]["metrics"] == report["metrics"]
    assert (d / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (d / "eval.md").read_text()
    assert "| metric | base | tuned | change |" in md and "| exact_match |" in md
    assert len(report["examples"]) == 5 and {"prompt", "reference", "base", "tuned"} <= set(report["examples"][0])
    types = [e["type"] for e in read_events(d / "events.jsonl")]
    assert types.index("eval") < types.index("succeeded")
    succeeded = read_events(d / "events.jsonl")[-1]
    assert succeeded["metrics"]["eval"]["tuned"]["loss"] == report["metrics"]["tuned"]["loss"]


def test_the_held_out_evaluation_keeps_within_its_time_budget(tiny_model_dir, qa_rows):
    """A service training's evaluation times a first batch and scores as many held-out rows as
    fit its budget (10% of the training's time): the first 8 when nothing more fits, every row
    when all do; a log line says when rows were left out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.data.jsonl import Dataset
    from tunery.spec import parse_inputs
    from tunery.train.events import EventSink
    from tunery.train.recipe import _evaluate_after_training

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = (qa_rows * 3)[:20]
    held = Dataset(path="t.jsonl", name="the last rows of t.jsonl, held out", format="prompt_completion", rows=rows,
                   lines=[], sha256="0" * 64)
    inputs = parse_inputs({"train_data": "t.jsonl", "peft_method": "full"})
    for budget, expected in ((0.0, 8), (1e6, 20)):
        sink = EventSink()
        logs: list[str] = []
        sink.listen(lambda event, logs=logs: logs.append(event.get("message", "")) if event["type"] == "log" else None)
        report = _evaluate_after_training(model, tokenizer, held, inputs, sink, False, budget)
        assert report["rows"] == expected and report["eval_seconds"] > 0
        cut = [line for line in logs if line.startswith("evaluated the first 8 of the 20 held-out rows")]
        assert bool(cut) == (expected < 20), logs


def rendered(report: dict) -> str:
    """The terminal table `tunery eval` prints for `report` (the CLI calls the same `render`)."""
    from rich.console import Console

    from tunery.eval.report import render

    console = Console(record=True, width=200, file=io.StringIO())
    render(report, console)
    return console.export_text()


def test_eval_compare_cli_writes_both_columns(tmp_path, split, tiny_model_dir):
    from test_cli import tunery

    train_file, test_file = split
    run_dir = tmp_path / "run"
    tunery("train", "--base", tiny_model_dir, "--train-data", train_file, "--max-steps", 2, "--no-run-validation",
           "--learning-rate", 1e-2, "-o", run_dir)
    out = tunery("eval", "--weights", run_dir, "--test-data", test_file, "--compare", "--json")
    report = json.loads(out.stdout)
    assert report["columns"] == ["base", "tuned"] and report["weights"] == str(run_dir)
    assert json.loads((run_dir / "eval.json").read_text())["metrics"] == report["metrics"]
    base_only = json.loads(tunery("eval", "--base", tiny_model_dir, "--test-data", test_file, "--json",
                                  "-o", tmp_path / "b").stdout)
    assert base_only["columns"] == ["base"]
    # the base column of --compare (adapter disabled) is the plain base model
    assert base_only["metrics"]["base"]["loss"] == pytest.approx(report["metrics"]["base"]["loss"], rel=1e-5)
    table = rendered(report)  # what `tunery eval` prints without --json (one model load less than asking it again)
    assert "change" in table and "exact_match" in table
    # An instruct base (a chat template): what tuning cost is measured by default, and said.
    cost = report["forgetting"]
    assert list(cost["metrics"]) == ["base", "tuned"] and cost["instructions"] == 24 and cost["general_texts"] == 48
    base, tuned = cost["metrics"]["base"], cost["metrics"]["tuned"]
    assert base["general_text_loss"] != pytest.approx(tuned["general_text_loss"], abs=1e-6)
    assert base["base_answer_loss"] != pytest.approx(tuned["base_answer_loss"], abs=1e-6)
    assert 0 <= tuned["answer_agreement"] <= 1 and "answer_agreement" not in base
    assert "what tuning cost: general-text loss" in " ".join(table.split())
    assert json.loads((run_dir / "manifest.json").read_text())["eval"]["forgetting"] == cost["metrics"]
    assert "## What tuning cost" in (run_dir / "eval.md").read_text()
    assert "forgetting" not in base_only
    off = json.loads(tunery("eval", "--weights", run_dir, "--test-data", test_file, "--no-forgetting", "--json",
                            "-o", tmp_path / "off").stdout)
    assert "forgetting" not in off
    refused = tunery("eval", "--base", tiny_model_dir, "--test-data", test_file, "--forgetting", check=False)
    assert refused.returncode != 0 and "compares tuned weights with their base" in refused.stderr


def test_an_untouched_adapter_costs_nothing(tmp_path, split, tiny_model_dir):
    """The forgetting measure can tell no change: an adapter trained one step at learning rate 1e-12 (LoRA's B
    still all but zero) has the base's losses and answers the base's answers word for word."""
    from tunery.eval.evaluate import evaluate

    train_file, test_file = split
    result = train({"train_data": str(train_file), "max_steps": 1, "run_validation": False, "learning_rate": 1e-12},
                   base=str(tiny_model_dir), output_dir=tmp_path / "run", progress=False)
    report = evaluate(test_file, weights=result.run_dir, progress=False)
    assert report["columns"] == ["tuned"]  # no --compare: the measure still holds the base beside it
    base, tuned = report["forgetting"]["metrics"]["base"], report["forgetting"]["metrics"]["tuned"]
    assert tuned["general_text_loss"] == pytest.approx(base["general_text_loss"], rel=1e-5)
    assert tuned["base_answer_loss"] == pytest.approx(base["base_answer_loss"], rel=1e-5)
    assert tuned["answer_agreement"] == pytest.approx(1.0)


@pytest.mark.slow
def test_smollm2_on_the_extraction_sample_beats_the_base(tmp_path):
    """The bundled sample on the real base, few steps: the tuned loss on the test split is lower."""
    from tunery.samples.extraction import splits

    train_rows, test_rows = splits(n_train=64, n_test=16)
    train_file = write_jsonl(tmp_path / "train.jsonl", train_rows)
    test_file = write_jsonl(tmp_path / "test.jsonl", test_rows)
    result = train({"train_data": str(train_file), "max_steps": 6, "train_batch_size": 8, "micro_batch_size": 8,
                    "learning_rate": 1e-3, "run_validation": False},
                   output_dir=tmp_path / "run", progress=False, test_data=test_file)
    m = result.manifest["eval"]["metrics"]
    assert m["tuned"]["loss"] < m["base"]["loss"]
    assert m["tuned"]["exact_match"] >= m["base"]["exact_match"]


@pytest.mark.parametrize("task", ["extraction", "summarization"])
def test_bundled_examples_are_what_their_seeded_generators_write(task, tmp_path):
    import importlib
    from pathlib import Path

    from tunery.data import read_jsonl
    from tunery.samples import write_splits

    module = importlib.import_module(f"tunery.samples.{task}")
    folder = Path(__file__).resolve().parents[1] / "examples" / task
    for committed, fresh in zip((folder / "train.jsonl", folder / "test.jsonl"),
                                write_splits(tmp_path, *module.splits()), strict=True):
        assert committed.read_text() == fresh.read_text()
        assert read_jsonl(committed).format == "prompt_completion"
    train_prompts = {r["prompt"] for r in read_jsonl(folder / "train.jsonl").rows}
    assert not train_prompts & {r["prompt"] for r in read_jsonl(folder / "test.jsonl").rows}
