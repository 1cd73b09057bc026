"""Predictor on the tiny random Llama: streaming, seeds, stops, cancel, adapter switching, weights forms."""

from __future__ import annotations

import json
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import torch

import tunery.infer.predict as predict_module
from tunery.errors import TuneryError
from tunery.infer.predict import Predictor, SamplingParams, predict
from tunery.models.resolve import resolve_base
from tunery.settings import get_settings

PROMPT = "Once upon a time"
GREEDY = SamplingParams(temperature=0, max_new_tokens=16)


def make_adapter(base_dir: Path, out: Path, seed: int, task_type: str | None = None) -> Path:
    """A random (non-identity) LoRA adapter for the tiny base, saved as training would."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type=task_type)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def isolated_home(tmp_path_factory):
    """Archives extract under TUNERY_HOME: keep them out of the real one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNERY_HOME", str(tmp_path_factory.mktemp("home")))
        get_settings.cache_clear()
        yield get_settings().home
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(tiny_model_dir, root / "a", seed=1, task_type="CAUSAL_LM"),
        "b": make_adapter(tiny_model_dir, root / "b", seed=2),
        "c": make_adapter(tiny_model_dir, root / "c", seed=3),
    }


@pytest.fixture(scope="module")
def run_dir(adapters, tiny_model_dir, tokenizer_dir, tmp_path_factory) -> Path:
    """A training run around adapter A: manifest, adapter/, tokenizer/, training_output.zip."""
    run = tmp_path_factory.mktemp("run")
    shutil.copytree(adapters["a"], run / "adapter")
    shutil.copytree(tokenizer_dir, run / "tokenizer")
    base = resolve_base(str(tiny_model_dir))
    manifest = {"base": base.as_dict() | {"name": str(tiny_model_dir)}, "inputs": {}, "peft_method": "lora"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    with zipfile.ZipFile(run / "training_output.zip", "w") as zf:
        for p in sorted(run.rglob("*")):
            if p.is_file() and p.suffix != ".zip":
                zf.write(p, p.relative_to(run).as_posix())
    return run


@pytest.fixture(scope="module")
def predictor(tiny_model_dir) -> Predictor:
    return Predictor(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def outputs(predictor, adapters) -> dict[str | None, str]:
    """Greedy output of the bare base and of adapters A and B (loaded here, in that order)."""
    return {
        key: predictor.generate(PROMPT, weights=adapters.get(key), params=GREEDY) for key in (None, "a", "b")
    }


def test_stream_yields_pieces_that_join_to_generate(predictor, tokenizer):
    metrics: dict = {}
    pieces = list(predictor.stream(PROMPT, params=GREEDY, metrics=metrics))
    assert len(pieces) > 3 and all(pieces)
    assert predictor.last_metrics == metrics
    assert "".join(pieces) == predictor.generate(PROMPT, params=GREEDY)
    # The prompt is tokenized as training tokenized it: special tokens on, no chat template.
    assert metrics["input_token_count"] == len(tokenizer(PROMPT, add_special_tokens=True).input_ids)
    assert metrics["output_token_count"] == 16 and metrics["stop_reason"] == "max_new_tokens"
    assert 0 < metrics["time_to_first_token"] <= metrics["predict_time"]
    assert metrics["tokens_per_second"] > 0


def test_same_seed_same_text_and_another_seed_differs(predictor):
    def sample(seed):
        return predictor.generate(
            PROMPT, params=SamplingParams(temperature=1.0, max_new_tokens=12, seed=seed)
        )

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_unseeded_sampling_reports_the_seed_it_used(predictor):
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    metrics: dict = {}
    text = predictor.generate(PROMPT, params=params, metrics=metrics)
    replay = SamplingParams(temperature=1.0, max_new_tokens=8, seed=metrics["seed"])
    assert predictor.generate(PROMPT, params=replay) == text


def test_stop_sequence_from_greedy_output_cuts_exactly_before_it(predictor):
    params = SamplingParams(temperature=0, max_new_tokens=40)
    pieces = list(predictor.stream(PROMPT, params=params))
    assert len(pieces) == 40  # one piece per token here, so pieces count tokens below
    text = "".join(pieces)
    # A stop that straddles the last two pieces, i.e. spans a token boundary.
    at = text.index(pieces[-1])
    assert at > 3, f"the greedy output is too repetitive for this test: {text!r}"
    stop = text[at - 3 : at + 3]
    metrics: dict = {}
    streamed = list(
        predictor.stream(
            PROMPT, params=SamplingParams(**{**vars(params), "stop_sequences": stop}), metrics=metrics
        )
    )
    assert "".join(streamed) == text[: text.index(stop)]
    assert not any(stop in p for p in streamed)
    assert metrics["stop_reason"] == "stop_sequence"
    # Generation ended on the token that completed the stop, not later.
    completing = next(k for k in range(1, 41) if stop in "".join(pieces[:k]))
    assert metrics["output_token_count"] == completing < 40


def test_max_new_tokens_bounds_the_output(predictor):
    for n in (1, 5):
        metrics: dict = {}
        predictor.generate(PROMPT, params=SamplingParams(temperature=0, max_new_tokens=n), metrics=metrics)
        assert metrics["output_token_count"] == n


def test_eos_ends_generation(predictor, tokenizer):
    first = predictor.generate(PROMPT, params=SamplingParams(temperature=0, max_new_tokens=1))
    config = predictor.base_model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = tokenizer(first, add_special_tokens=False).input_ids[0]
    try:
        metrics: dict = {}
        predictor.generate(PROMPT, params=GREEDY, metrics=metrics)
    finally:
        config.eos_token_id = saved
    assert metrics["stop_reason"] == "eos" and metrics["output_token_count"] == 1


def test_cancel_from_another_thread_stops_early(predictor):
    cancel, started, got = threading.Event(), threading.Event(), []
    metrics: dict = {}

    def consume():
        for piece in predictor.stream(
            PROMPT, params=SamplingParams(temperature=0, max_new_tokens=800), cancel=cancel, metrics=metrics
        ):
            got.append(piece)
            started.set()

    worker = threading.Thread(target=consume)
    worker.start()
    assert started.wait(30)
    cancel.set()
    worker.join(30)
    assert not worker.is_alive()
    assert metrics["stop_reason"] == "cancelled"
    assert 0 < metrics["output_token_count"] < 100
    assert got and len(got) <= metrics["output_token_count"]


def test_abandoned_stream_frees_the_model(predictor):
    stream = predictor.stream(PROMPT, params=SamplingParams(temperature=0, max_new_tokens=800))
    next(stream)
    stream.close()
    assert predictor.last_metrics["stop_reason"] == "aborted"
    assert predictor.last_metrics["output_token_count"] < 100
    assert predictor.generate(PROMPT, params=SamplingParams(temperature=0, max_new_tokens=2))


def test_adapters_switch_without_reloading_the_base(predictor, adapters, outputs):
    base_model, loads = predictor.base_model, predictor.adapter_loads
    assert len(set(outputs.values())) == 3, outputs
    assert predictor.generate(PROMPT, weights=adapters["a"], params=GREEDY) == outputs["a"]
    assert predictor.generate(PROMPT, params=GREEDY) == outputs[None]
    assert predictor.generate(PROMPT, weights=adapters["b"], params=GREEDY) == outputs["b"]
    assert predictor.generate(PROMPT, weights=str(adapters["a"]), params=GREEDY) == outputs["a"]
    assert predictor.base_model is base_model and predictor.base_loads == 1
    assert predictor.adapter_loads == loads  # A and B were loaded once, by the outputs fixture
    assert predictor.loaded_adapters[-2:] == [str(adapters["b"].resolve()), str(adapters["a"].resolve())]


def test_lru_evicts_beyond_max_adapters(tiny_model_dir, adapters, outputs):
    small = Predictor(str(tiny_model_dir), device="cpu", max_adapters=2)
    for key in ("a", "b", "c"):
        small.generate(PROMPT, weights=adapters[key], params=GREEDY)
    assert small.loaded_adapters == [str(adapters["b"].resolve()), str(adapters["c"].resolve())]
    assert len(small._peft.peft_config) == 2  # evicted from peft too, not just from the index
    # A was evicted: it is loaded again, and gives the same text as before.
    assert small.generate(PROMPT, weights=adapters["a"], params=GREEDY) == outputs["a"]
    assert small.adapter_loads == 4 and small.base_loads == 1
    assert small.loaded_adapters == [str(adapters["c"].resolve()), str(adapters["a"].resolve())]


def test_adapter_retrained_in_place_is_reloaded(predictor, adapters, outputs, tmp_path):
    adapter = shutil.copytree(adapters["a"], tmp_path / "adapter")
    assert predictor.generate(PROMPT, weights=adapter, params=GREEDY) == outputs["a"]
    adapters_before = len(predictor._peft.peft_config)
    weights_file = adapter / "adapter_model.safetensors"
    shutil.copyfile(adapters["b"] / weights_file.name, weights_file)
    assert predictor.generate(PROMPT, weights=adapter, params=GREEDY) == outputs["b"]
    assert len(predictor._peft.peft_config) == adapters_before  # the stale copy was deleted


@pytest.mark.parametrize("form", ["run_dir", "zip", "bare_adapter", "run_adapter_subdir"])
def test_every_weights_form_gives_the_adapters_output(
    predictor, run_dir, adapters, outputs, form, isolated_home
):
    weights = {
        "run_dir": run_dir,
        "zip": run_dir / "training_output.zip",
        "bare_adapter": adapters["a"],
        "run_adapter_subdir": run_dir / "adapter",
    }[form]
    assert predictor.generate(PROMPT, weights=weights, params=GREEDY) == outputs["a"]
    if form == "zip":
        assert any((isolated_home / "weights").iterdir())


def test_full_finetune_run_gets_its_own_model(predictor, tiny_model_dir, tokenizer_dir, tmp_path, outputs):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(-3.0)  # a visible change, as if fine-tuned
    model.save_pretrained(tmp_path / "model")
    shutil.copytree(tokenizer_dir, tmp_path / "tokenizer")
    (tmp_path / "manifest.json").write_text(
        json.dumps({"base": {"name": str(tiny_model_dir)}, "peft_method": "full"})
    )
    base_model = predictor.base_model
    full = predictor.generate(PROMPT, weights=tmp_path, params=GREEDY)
    assert full != outputs[None]
    assert predictor.generate(PROMPT, weights=tmp_path, params=GREEDY) == full
    assert predictor.full_loads == 1
    assert predictor.generate(PROMPT, params=GREEDY) == outputs[None]
    assert predictor.base_model is base_model


def test_missing_weights_path_is_a_tunery_error_naming_it(predictor, tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(TuneryError, match="no-such-run"):
        predictor.stream(PROMPT, weights=missing)


def test_adapter_trained_on_another_base_is_refused(predictor, run_dir, tmp_path):
    other = tmp_path / "run"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("*.zip"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["base"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TuneryError, match="trained on base"):
        predictor.generate(PROMPT, weights=other, params=GREEDY)


def test_concurrent_requests_are_served_one_at_a_time(predictor, adapters, outputs):
    results: dict = {}

    def ask(key):
        results[key] = predictor.generate(PROMPT, weights=adapters.get(key), params=GREEDY)

    threads = [threading.Thread(target=ask, args=(k,)) for k in ("a", "b", None)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == outputs


def test_one_shot_predict_reuses_the_loaded_base(adapters, outputs, monkeypatch):
    monkeypatch.setattr(predict_module, "_LAST", None)
    # The base comes from the adapter's config (the tiny model's directory).
    assert predict(PROMPT, weights=str(adapters["a"]), temperature=0, max_new_tokens=16) == outputs["a"]
    cached = predict_module._LAST
    assert predict(PROMPT, weights=str(adapters["b"]), temperature=0, max_new_tokens=16) == outputs["b"]
    assert predict_module._LAST is cached and cached.base_loads == 1
