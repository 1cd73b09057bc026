"""The training recipe on a tiny random Llama: outputs, determinism, accumulation, resume, methods, events."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import write_jsonl
from tunery.errors import DataError, SpecError, TuneryError
from tunery.train.events import read_events
from tunery.train.recipe import train

FAST = {"run_validation": False, "save_steps": 1000, "logging_steps": 1}


@pytest.fixture
def data_file(tmp_path, qa_rows):
    return write_jsonl(tmp_path / "train.jsonl", qa_rows)


def adapter_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def run(tmp_path, name, data_file, tiny_model_dir, **inputs):
    spec = {"train_data": str(data_file), **FAST, **inputs}
    return train(spec, base=str(tiny_model_dir), output_dir=tmp_path / name, progress=False)


def test_run_directory_manifest_and_archive(tmp_path, data_file, tiny_model_dir):
    result = run(tmp_path, "r", data_file, tiny_model_dir, max_steps=3, run_validation=True,
                 num_validation_samples=4, eval_steps=2, validation_prompt="Item: the red cat.\nAnimal:")
    d = result.run_dir
    assert {"adapter", "tokenizer", "manifest.json", "events.jsonl", "training_output.zip"} <= {
        p.name for p in d.iterdir()}
    assert (d / "adapter" / "adapter_config.json").is_file()
    assert (d / "tokenizer" / "tokenizer.json").is_file()
    m = json.loads((d / "manifest.json").read_text())
    assert m["base"]["name"] == str(tiny_model_dir) and len(m["base"]["sha256"]) == 64
    assert m["inputs"]["max_steps"] == 3 and "num_train_epochs" not in m["inputs"]  # as given
    assert m["resolved_inputs"]["num_train_epochs"] == 3 and m["resolved_inputs"]["lora_rank"] == 8
    assert m["data"]["train_data"]["rows"] == 24 and len(m["data"]["train_data"]["sha256"]) == 64
    assert m["data_stats"]["train_rows"] == 20 and m["data_stats"]["validation_rows"] == 4
    steps = [h for h in m["metrics"]["history"] if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3]
    assert all(h["tokens_per_second"] > 0 and h["learning_rate"] is not None for h in steps)
    assert any("val_loss" in h for h in m["metrics"]["history"])
    assert m["samples"] and m["samples"][0]["prompt"].startswith("Item: the red cat")
    assert set(m["versions"]) >= {"tunery", "torch", "transformers", "peft"}
    with zipfile.ZipFile(result.archive) as zf:
        names = set(zf.namelist())
    assert {"manifest.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
            "tokenizer/tokenizer.json"} <= names


def test_adapter_loads_with_peft(tmp_path, data_file, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run(tmp_path, "r", data_file, tiny_model_dir, max_steps=2, learning_rate=1e-2)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    x = torch.tensor([[1, 2, 3, 4]])
    before = base(input_ids=x).logits
    tuned = PeftModel.from_pretrained(base, result.run_dir / "adapter")
    assert not torch.allclose(tuned(input_ids=x).logits, before, atol=1e-6)


def test_same_seed_same_weights(tmp_path, data_file, tiny_model_dir):
    a = adapter_weights(run(tmp_path, "a", data_file, tiny_model_dir, max_steps=3).run_dir)
    b = adapter_weights(run(tmp_path, "b", data_file, tiny_model_dir, max_steps=3).run_dir)
    c = adapter_weights(run(tmp_path, "c", data_file, tiny_model_dir, max_steps=3, seed=7).run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_gradient_accumulation_matches_full_batch(tmp_path, data_file, tiny_model_dir):
    # fp32: bf16 autocast (auto on a bf16 CPU) rounds differently for different batch shapes.
    common = {"max_steps": 2, "train_batch_size": 8, "lora_dropout": 0.0, "learning_rate": 1e-2, "precision": "fp32"}
    acc = adapter_weights(run(tmp_path, "acc", data_file, tiny_model_dir, micro_batch_size=4, **common).run_dir)
    full = adapter_weights(run(tmp_path, "full", data_file, tiny_model_dir, micro_batch_size=8, **common).run_dir)
    init = adapter_weights(run(tmp_path, "zero", data_file, tiny_model_dir, micro_batch_size=8,
                               **{**common, "learning_rate": 1e-9}).run_dir)
    for k in acc:
        assert torch.allclose(acc[k], full[k], atol=2e-5), k
    assert any(not torch.allclose(full[k], init[k], atol=1e-4) for k in full)  # the steps did move weights


class StopAt(TrainerCallback):
    """Simulates a crash right after a step (the checkpoint before it is on disk)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated crash")


def test_resume_equals_uninterrupted(tmp_path, data_file, tiny_model_dir):
    spec = {"train_data": str(data_file), **FAST, "max_steps": 4, "save_steps": 2}
    straight = train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "crash", progress=False, callbacks=[StopAt(3)])
    assert (tmp_path / "crash" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "crash" / "adapter").exists()
    # A save cut short by the crash: a newer checkpoint folder without trainer_state.json.
    torn = tmp_path / "crash" / "checkpoints" / "checkpoint-3"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"partial")
    resumed = train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "crash", progress=False, resume=True)
    a, b = adapter_weights(straight.run_dir), adapter_weights(resumed.run_dir)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    events = [e["type"] for e in read_events(tmp_path / "crash" / "events.jsonl")]
    assert events.count("failed") == 1 and events[-1] == "succeeded"
    assert resumed.manifest["metrics"]["steps"] == 4


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_other_methods_train(tmp_path, data_file, tiny_model_dir, method):
    result = run(tmp_path, method, data_file, tiny_model_dir, max_steps=2, peft_method=method, learning_rate=1e-3)
    out = result.run_dir / ("model" if method == "full" else "adapter")
    assert out.is_dir() and result.manifest["peft_method"] == method
    losses = [h["loss"] for h in result.manifest["metrics"]["history"] if "loss" in h]
    assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses)
    if method == "full":
        from transformers import AutoModelForCausalLM

        tuned = AutoModelForCausalLM.from_pretrained(out).state_dict()
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
        assert any(not torch.equal(tuned[k], base[k]) for k in base)
    else:
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == 8 and cfg["lora_alpha"] == 16


def test_packing_trains_and_reports_fill(tmp_path, data_file, tiny_model_dir):
    result = run(tmp_path, "p", data_file, tiny_model_dir, max_steps=2, pack_sequences=True, chunk_size=64)
    stats = result.manifest["data_stats"]
    assert stats["sequences"] < stats["train_rows"]  # several examples per sequence
    assert 0.5 < stats["packing_fill"] <= 1.0


def test_events_in_order(tmp_path, data_file, tiny_model_dir):
    events_file = tmp_path / "events.jsonl"
    spec = {"train_data": str(data_file), **FAST, "max_steps": 2, "run_validation": True,
            "num_validation_samples": 4, "eval_steps": 1, "save_steps": 1, "validation_prompt": "Item:"}
    train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "r", progress=False, events=events_file)
    types = [e["type"] for e in read_events(events_file)]
    assert types[0] == "started" and types[-1] == "succeeded"
    for t in ("data", "step", "validation", "sample", "checkpoint"):
        assert t in types, t
    assert types.index("step") < types.index("validation") < types.index("sample")


def test_bad_data_fails_before_model_load(tmp_path, tiny_model_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "not json", {"text": "x"}])
    with pytest.raises(DataError) as info:
        train({"train_data": str(bad)}, base=str(tiny_model_dir), output_dir=tmp_path / "r", progress=False)
    assert [e.line for e in info.value.errors] == [2, 3]
    events = read_events(tmp_path / "r" / "events.jsonl")
    assert [e["type"] for e in events] == ["started", "failed"]
    assert "bad.jsonl:2" in events[-1]["error"]


def test_invalid_inputs_are_rejected():
    with pytest.raises(SpecError, match="micro_batch_size"):
        train({"train_data": "x.jsonl", "train_batch_size": 6, "micro_batch_size": 4})
    with pytest.raises(SpecError, match="unknown input"):
        train({"train_data": "x.jsonl", "epochs": 3})


def test_too_few_rows_for_validation(tmp_path, data_file, tiny_model_dir):
    with pytest.raises(TuneryError, match="num_validation_samples"):
        train({"train_data": str(data_file)}, base=str(tiny_model_dir), output_dir=tmp_path / "r", progress=False)


@pytest.mark.parametrize("variant", ["decoder_then_chunks", "through_forward"])
def test_labelled_only_loss_equals_the_models_own(tiny_model_dir, tokenizer, qa_rows, variant):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunery.data import Collator, pack, tokenize_rows, unpacked
    from tunery.train.loss import TokenCounts, labelled_loss_through_forward
    from tunery.train.loss import labelled_loss as chunked

    labelled_loss = chunked if variant == "decoder_then_chunks" else labelled_loss_through_forward

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    examples = tokenize_rows(qa_rows[:6], "prompt_completion", tokenizer, max_length=64)
    for packed, seqs in ((False, unpacked(examples)), (True, pack(examples, 64))):
        batch = Collator(tokenizer.pad_token_id, packed=packed)(seqs)
        out = model(**batch)
        reference = out.loss
        counts = TokenCounts()
        ours = labelled_loss(model, batch, counts=counts)
        assert ours.item() == pytest.approx(reference.item(), abs=1e-5)
        # the token accuracy counts the labelled next tokens the model's own logits rank first
        target = batch["labels"][:, 1:]
        keep = target != -100
        right = int((out.logits[:, :-1].argmax(-1)[keep] == target[keep]).sum())
        assert (int(counts.correct), int(counts.total)) == (right, int(keep.sum()))
        assert counts.take() and counts.take() == (0, 0)
        # the gradients agree too
        ours.backward()
        g1 = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        model(**batch).loss.backward()
        g2 = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2, strict=True))
    if variant == "through_forward":
        return
    # chunked (with recomputation) gives the same value as one chunk
    import tunery.train.loss as L

    batch = Collator(tokenizer.pad_token_id, packed=False)(unpacked(examples))
    one = TokenCounts()
    whole = labelled_loss(model, batch, counts=one).item()
    L.CHUNK_ROWS, saved = 3, L.CHUNK_ROWS
    try:
        # the same sum in another order: float32 rounding (a few ulps of a loss near 10) may differ
        chunks = TokenCounts()
        loss = labelled_loss(model, batch, counts=chunks)
        assert loss.item() == pytest.approx(whole, rel=1e-6)
        loss.backward()  # the recomputation in backward adds nothing to the counts
        assert (int(chunks.correct), int(chunks.total)) == (int(one.correct), int(one.total))
    finally:
        L.CHUNK_ROWS = saved


def test_step_rates_leave_out_validation_time(tmp_path, data_file, tiny_model_dir):
    """A validation with a long sample generation between steps must not show up as a slow step."""
    result = run(tmp_path, "r", data_file, tiny_model_dir, max_steps=4, run_validation=True,
                 num_validation_samples=4, eval_steps=2, validation_prompt="Item:")
    steps = {h["step"]: h["tokens_per_second"] for h in result.manifest["metrics"]["history"] if "loss" in h}
    # step 3 comes right after the validation at step 2; its rate is of the same order as the others
    assert steps[3] > 0.3 * min(steps[1], steps[2], steps[4])


class CrashAfterSave(TrainerCallback):
    """Simulates a crash right after the checkpoint of `step` was written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated crash after the final checkpoint")


def test_resume_from_the_final_checkpoint_trains_no_extra_step(tmp_path, data_file, tiny_model_dir):
    spec = {"train_data": str(data_file), **FAST, "max_steps": 4, "save_steps": 2}
    straight = train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "crash", progress=False,
              callbacks=[CrashAfterSave(4)])
    resumed = train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "crash", progress=False, resume=True)
    events = read_events(tmp_path / "crash" / "events.jsonl")
    assert max(e["step"] for e in events if e["type"] == "step") == 4  # no step 5
    assert resumed.manifest["metrics"]["steps"] == 4
    assert [h["step"] for h in resumed.manifest["metrics"]["history"] if "loss" in h] == [1, 2, 3, 4]
    a, b = adapter_weights(straight.run_dir), adapter_weights(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


class OutOfMemoryAt(TrainerCallback):
    """Raises what torch raises when the GPU runs out of memory, at the end of step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total)")


def test_out_of_memory_says_what_to_change(tmp_path, data_file, tiny_model_dir):
    from tunery.errors import OutOfMemoryError

    spec = {"train_data": str(data_file), **FAST, "max_steps": 4, "train_batch_size": 8, "micro_batch_size": 4}
    with pytest.raises(OutOfMemoryError) as info:
        train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "r", progress=False, callbacks=[OutOfMemoryAt(2)])
    message = str(info.value)
    assert message.startswith("out of memory during training: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "micro_batch_size 2 (train_batch_size stays 8" in message
    assert "gradient_checkpointing true" in message and "peft_method qlora" in message
    failed = [e for e in read_events(tmp_path / "r" / "events.jsonl") if e["type"] == "failed"]
    assert failed[-1]["error"] == message and failed[-1]["error_type"] == "OutOfMemoryError"


def _validations(events_file) -> list[tuple[int, float]]:
    """(step, validation loss) of each evaluation during training (the one after it left out)."""
    vals = [(e["step"], e["val_loss"]) for e in read_events(events_file) if e["type"] == "validation"]
    return vals[:-1]


def test_the_best_evaluation_is_kept_and_said(tmp_path, data_file, tiny_model_dir):
    """With a validation set the run ends with the weights of its lowest validation loss (a high
    learning rate, LoRA+ 16 and Replicate's dropout 0.05 make the last step worse than an earlier one), checkpointed when it happened
    and named in a log event; the evaluation after training is that checkpoint's."""
    events = tmp_path / "events.jsonl"
    spec = {"train_data": str(data_file), "num_validation_samples": 4, "eval_steps": 1, "max_steps": 10,
            "learning_rate": 0.05, "loraplus_lr_ratio": 16, "lora_dropout": 0.05, "logging_steps": 1, "save_steps": 1000,
            "save_total_limit": 1}
    result = train(spec, base=str(tiny_model_dir), output_dir=tmp_path / "r", progress=False, events=events)
    vals = _validations(events)
    best_step, best = min(vals, key=lambda v: v[1])
    assert len(vals) == 10 and best_step < 10 and best < vals[-1][1]  # the last step is not the best
    kept = result.manifest["metrics"]["kept_checkpoint"]
    assert kept == {"step": best_step, "metric": "loss", "value": pytest.approx(best), "last_step": 10,
                    "stopped_early": False}
    assert result.manifest["metrics"]["val_loss"] == pytest.approx(best, abs=1e-5)
    # the best checkpoint outlived save_total_limit=1, and the run's adapter is its weights
    ckpt = result.run_dir / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors"
    final = adapter_weights(result.run_dir)
    assert all(torch.equal(final[k], v) for k, v in load_file(str(ckpt)).items())
    logs = [e["message"] for e in read_events(events) if e["type"] == "log"]
    assert f"kept the checkpoint of step {best_step} (validation loss {best:.4f}, the best of 10 evaluations) " \
           f"instead of step 10's ({vals[-1][1]:.4f})" in logs


def test_early_stopping_and_keeping_the_last_step(tmp_path, data_file, tiny_model_dir):
    """early_stopping_patience: the training stops after that many evaluations without a new best;
    keep_best_checkpoint=false ends with the last step's weights."""
    base = {"train_data": str(data_file), "num_validation_samples": 4, "eval_steps": 1, "max_steps": 10,
            "learning_rate": 0.05, "loraplus_lr_ratio": 16, "lora_dropout": 0.05, "logging_steps": 1, "save_steps": 1000}
    events = tmp_path / "events.jsonl"
    result = train({**base, "early_stopping_patience": 2}, base=str(tiny_model_dir), output_dir=tmp_path / "r",
                   progress=False, events=events)
    vals = _validations(events)
    best_step, best = min(vals, key=lambda v: v[1])
    assert vals[-1][0] == best_step + 2 < 10  # two evaluations without a new best, then stop
    assert result.manifest["metrics"]["steps"] == best_step + 2
    assert result.manifest["metrics"]["kept_checkpoint"]["stopped_early"] is True
    logs = [e["message"] for e in read_events(events) if e["type"] == "log"]
    assert any(m.startswith(f"stopping early at step {best_step + 2}: validation loss has not improved on "
                            f"{best:.4f} (step {best_step}) for 2 evaluations") for m in logs)

    last = train({**base, "keep_best_checkpoint": False}, base=str(tiny_model_dir), output_dir=tmp_path / "last",
                 progress=False, events=tmp_path / "last.jsonl")
    vals = _validations(tmp_path / "last.jsonl")
    assert last.manifest["metrics"]["kept_checkpoint"] is None  # no best tracked: the last step's weights
    assert last.manifest["metrics"]["val_loss"] == pytest.approx(vals[-1][1], abs=1e-5) != min(v for _, v in vals)


def test_early_stopping_needs_a_validation_set(tmp_path, data_file, tiny_model_dir):
    with pytest.raises(SpecError, match="early_stopping_patience counts evaluations, and run_validation is false"):
        train({"train_data": str(data_file), "early_stopping_patience": 2, "run_validation": False})
    with pytest.raises(SpecError, match="early_stopping_patience counts evaluations on a validation set"):
        train({"train_data": str(data_file), "early_stopping_patience": 2, "num_validation_samples": 0},
              base=str(tiny_model_dir), output_dir=tmp_path / "r", progress=False)
    events = read_events(tmp_path / "r" / "events.jsonl")
    assert not [e for e in events if e["type"] in ("memory", "step")]  # refused before the model loaded


def test_token_accuracy_in_steps_validations_and_the_manifest(tmp_path, data_file, tiny_model_dir):
    result = run(tmp_path, "r", data_file, tiny_model_dir, max_steps=2, run_validation=True,
                 num_validation_samples=4, eval_steps=1, learning_rate=0.05)
    history = result.manifest["metrics"]["history"]
    steps = [h for h in history if "loss" in h]
    vals = [h for h in history if "val_loss" in h]
    assert len(steps) == 2 and all(0.0 <= h["token_accuracy"] <= 1.0 for h in steps)
    assert len(vals) == 3 and all(0.0 <= h["val_token_accuracy"] <= 1.0 for h in vals)
    assert 0.0 <= result.manifest["metrics"]["val_token_accuracy"] <= 1.0
