"""The embedded engine on the tiny random Llama: streaming, seeds, stops, cancel, adapter switching,
weights forms, and continuous batching (joining, leaving, mixed adapters, per-row sampling)."""

from __future__ import annotations

import json
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

import tunery.infer.predict as predict_module
from tunery.errors import TuneryError
from tunery.infer.embedded import EmbeddedEngine
from tunery.infer.generation import EngineBusy, Request, SamplingParams
from tunery.infer.predict import predict
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
def engine(tiny_model_dir):
    engine = EmbeddedEngine(str(tiny_model_dir), device="cpu", precision="fp32", max_batch=8, max_queue=16)
    yield engine
    engine.close()


def run(engine, prompt=PROMPT, weights=None, params=GREEDY) -> tuple[str, dict]:
    gen = engine.submit(Request.make(prompt, weights=weights, params=params))
    return gen.text(), gen.metrics


def text(engine, prompt=PROMPT, weights=None, params=GREEDY) -> str:
    return run(engine, prompt, weights, params)[0]


@pytest.fixture(scope="module")
def outputs(engine, adapters) -> dict[str | None, str]:
    """Greedy output of the bare base and of adapters A and B (loaded here, in that order), each alone."""
    return {key: text(engine, weights=adapters.get(key)) for key in (None, "a", "b")}


def test_stream_yields_pieces_that_join_to_the_text(engine, tokenizer):
    gen = engine.submit(Request(PROMPT, GREEDY))
    pieces = list(gen)
    metrics = gen.metrics
    assert len(pieces) > 3 and all(pieces)
    assert "".join(pieces) == text(engine)
    # The prompt is tokenized as training tokenized it: special tokens on, no chat template.
    assert metrics["input_token_count"] == len(tokenizer(PROMPT, add_special_tokens=True).input_ids)
    assert metrics["output_token_count"] == 16 and metrics["stop_reason"] == "max_new_tokens"
    assert 0 < metrics["time_to_first_token"] <= metrics["predict_time"]
    assert metrics["tokens_per_second"] > 0


def test_same_seed_same_text_and_another_seed_differs(engine):
    def sample(seed):
        return text(engine, params=SamplingParams(temperature=1.0, max_new_tokens=12, seed=seed))

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_unseeded_sampling_reports_the_seed_it_used(engine):
    out, metrics = run(engine, params=SamplingParams(temperature=1.0, max_new_tokens=8))
    replay = SamplingParams(temperature=1.0, max_new_tokens=8, seed=metrics["seed"])
    assert text(engine, params=replay) == out


def test_stop_sequence_from_greedy_output_cuts_exactly_before_it(engine):
    params = SamplingParams(temperature=0, max_new_tokens=40)
    pieces = list(engine.submit(Request(PROMPT, params)))
    assert len(pieces) == 40  # one piece per token here, so pieces count tokens below
    full = "".join(pieces)
    # A stop that straddles the last two pieces, i.e. spans a token boundary.
    at = full.index(pieces[-1])
    assert at > 3, f"the greedy output is too repetitive for this test: {full!r}"
    stop = full[at - 3 : at + 3]
    gen = engine.submit(Request(PROMPT, SamplingParams(**{**vars(params), "stop_sequences": stop})))
    streamed = list(gen)
    assert "".join(streamed) == full[: full.index(stop)]
    assert not any(stop in p for p in streamed)
    assert gen.metrics["stop_reason"] == "stop_sequence"
    # Generation ended on the token that completed the stop, not later.
    completing = next(k for k in range(1, 41) if stop in "".join(pieces[:k]))
    assert gen.metrics["output_token_count"] == completing < 40


def test_max_new_tokens_bounds_the_output(engine):
    for n in (1, 5):
        assert run(engine, params=SamplingParams(temperature=0, max_new_tokens=n))[1]["output_token_count"] == n


def test_eos_ends_generation(engine, tokenizer):
    first = text(engine, params=SamplingParams(temperature=0, max_new_tokens=1))
    config = engine.base_model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = tokenizer(first, add_special_tokens=False).input_ids[0]
    try:
        _, metrics = run(engine)
    finally:
        config.eos_token_id = saved
    assert metrics["stop_reason"] == "eos" and metrics["output_token_count"] == 1


def test_min_new_tokens_keeps_eos_out_until_that_many_tokens(engine, tokenizer):
    first = text(engine, params=SamplingParams(temperature=0, max_new_tokens=1))
    eos = tokenizer(first, add_special_tokens=False).input_ids[0]
    config = engine.base_model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = eos  # the greedy first token ends generation at once
    try:
        _, plain = run(engine)
        gen = engine.submit(Request.make(PROMPT, params=SamplingParams(temperature=0, max_new_tokens=6,
                                                                       min_new_tokens=4)))
        gen.text()
        sampled, sampled_metrics = run(engine, params=SamplingParams(max_new_tokens=5, min_new_tokens=5, seed=3,
                                                                     top_k=0, top_p=1.0))
    finally:
        config.eos_token_id = saved
    assert plain["stop_reason"] == "eos" and plain["output_token_count"] == 1
    assert eos not in gen.token_ids[:4] and gen.metrics["output_token_count"] >= 4
    assert sampled_metrics["output_token_count"] == 5 and sampled_metrics["stop_reason"] == "max_new_tokens"


@pytest.mark.parametrize("bad", [-2, 7, 1.5, True])
def test_min_new_tokens_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=6, min_new_tokens=bad)


def test_cancel_from_another_thread_stops_early(engine):
    gen = engine.submit(Request(PROMPT, SamplingParams(temperature=0, max_new_tokens=800)))
    got = []
    for piece in gen:
        got.append(piece)
        if len(got) == 2:
            threading.Thread(target=gen.cancel).start()
    assert gen.metrics["stop_reason"] == "cancelled"
    assert 0 < gen.metrics["output_token_count"] < 100
    assert got and len(got) <= gen.metrics["output_token_count"]


def test_abandoned_stream_ends_the_request(engine):
    gen = engine.submit(Request(PROMPT, SamplingParams(temperature=0, max_new_tokens=800)))
    pieces = iter(gen)
    next(pieces)
    pieces.close()
    assert gen.wait(30)
    assert gen.metrics["stop_reason"] == "cancelled" and gen.metrics["output_token_count"] < 100
    assert text(engine, params=SamplingParams(temperature=0, max_new_tokens=2))


def test_adapters_switch_without_reloading_the_base(engine, adapters, outputs):
    base_model, loads = engine.base_model, engine.adapter_loads
    assert len(set(outputs.values())) == 3, outputs
    assert text(engine, weights=adapters["a"]) == outputs["a"]
    assert text(engine) == outputs[None]
    assert text(engine, weights=adapters["b"]) == outputs["b"]
    assert text(engine, weights=str(adapters["a"])) == outputs["a"]
    assert engine.base_model is base_model and engine.base_loads == 1
    assert engine.adapter_loads == loads  # A and B were loaded once, by the outputs fixture
    assert engine.loaded_adapters[-2:] == [str(adapters["b"].resolve()), str(adapters["a"].resolve())]


def test_column_major_linears_keep_every_value_and_every_logit(tiny_model_dir):
    from transformers import LlamaForCausalLM

    from tunery.models.load import column_major_linears

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 2, 7], [3, 3, 8, 1, 4]])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # q, k, v, o, gate, up, down in each of the 2 layers; the LM head is tied to the embedding.
    assert len(column_major_linears(model)) == 2 * 7 + 1
    for m in linears:
        out_features, in_features = m.weight.shape
        assert m.weight.stride() == (1, out_features), m
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=ids).logits, logits, atol=1e-5)
    assert column_major_linears(model) == []  # already laid out


def test_column_major_for_a_block_lays_the_weights_back(tiny_model_dir):
    from transformers import LlamaForCausalLM

    from tunery.models.load import column_major

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    q = model.model.layers[0].self_attn.q_proj.weight
    before = q.detach().clone()
    with column_major(model):
        assert q.stride() == (1, q.shape[0])
    assert q.is_contiguous() and torch.equal(q, before)
    assert model.lm_head.weight.is_contiguous() and model.lm_head.weight is model.model.embed_tokens.weight


def test_the_engine_serves_its_base_column_major_and_adapters_on_top(engine, adapters, outputs):
    q = engine.base_model.model.layers[0].self_attn.q_proj  # a peft LoRA layer once adapters are loaded
    weight = getattr(q, "base_layer", q).weight
    assert weight.stride() == (1, weight.shape[0])
    assert text(engine, weights=adapters["a"]) == outputs["a"]


def test_lru_evicts_beyond_max_adapters(tiny_model_dir, adapters, outputs):
    small = EmbeddedEngine(str(tiny_model_dir), device="cpu", precision="fp32", max_adapters=2)
    try:
        for key in ("a", "b", "c"):
            text(small, weights=adapters[key])
        assert small.loaded_adapters == [str(adapters["b"].resolve()), str(adapters["c"].resolve())]
        assert len(small._peft.peft_config) == 2  # evicted from peft too, not just from the index
        # A was evicted: it is loaded again, and gives the same text as before.
        assert text(small, weights=adapters["a"]) == outputs["a"]
        assert small.adapter_loads == 4 and small.base_loads == 1
        assert small.loaded_adapters == [str(adapters["c"].resolve()), str(adapters["a"].resolve())]
    finally:
        small.close()


def test_adapter_retrained_in_place_is_reloaded(engine, adapters, outputs, tmp_path):
    adapter = shutil.copytree(adapters["a"], tmp_path / "adapter")
    assert text(engine, weights=adapter) == outputs["a"]
    adapters_before = len(engine._peft.peft_config)
    weights_file = adapter / "adapter_model.safetensors"
    shutil.copyfile(adapters["b"] / weights_file.name, weights_file)
    assert text(engine, weights=adapter) == outputs["b"]
    assert len(engine._peft.peft_config) == adapters_before  # the stale copy was deleted


@pytest.mark.parametrize("form", ["run_dir", "zip", "bare_adapter", "run_adapter_subdir"])
def test_every_weights_form_gives_the_adapters_output(engine, run_dir, adapters, outputs, form, isolated_home):
    weights = {
        "run_dir": run_dir,
        "zip": run_dir / "training_output.zip",
        "bare_adapter": adapters["a"],
        "run_adapter_subdir": run_dir / "adapter",
    }[form]
    assert text(engine, weights=weights) == outputs["a"]
    if form == "zip":
        assert any((isolated_home / "weights").iterdir())


def test_full_finetune_run_gets_its_own_model(engine, tiny_model_dir, tokenizer_dir, tmp_path, outputs):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(-3.0)  # a visible change, as if fine-tuned
    model.save_pretrained(tmp_path / "model")
    shutil.copytree(tokenizer_dir, tmp_path / "tokenizer")
    (tmp_path / "manifest.json").write_text(
        json.dumps({"base": {"name": str(tiny_model_dir)}, "peft_method": "full"})
    )
    base_model, loads = engine.base_model, engine.full_loads
    full = text(engine, weights=tmp_path)
    assert full != outputs[None]
    # The full model and the base generate at the same time, each in its own batch.
    both = [engine.submit(Request.make(PROMPT, weights=w, params=GREEDY)) for w in (tmp_path, None, tmp_path)]
    assert [g.text() for g in both] == [full, outputs[None], full]
    assert engine.full_loads == loads + 1
    assert engine.base_model is base_model


def test_missing_weights_path_is_a_tunery_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(TuneryError, match="no-such-run"):
        Request.make(PROMPT, weights=missing)


def test_adapter_trained_on_another_base_fails_that_request_only(engine, run_dir, tmp_path, outputs):
    other = tmp_path / "run"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("*.zip"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["base"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    fine = engine.submit(Request(PROMPT, GREEDY))
    with pytest.raises(TuneryError, match="trained on base"):
        text(engine, weights=other)
    assert fine.text() == outputs[None]


# -- continuous batching


def test_concurrent_requests_on_base_and_two_adapters_share_batches_and_match_alone(engine, adapters, outputs):
    keys = [None, "a", "b"] * 3
    peak = 0
    gens = [engine.submit(Request.make(PROMPT, weights=adapters.get(k), params=GREEDY)) for k in keys]
    while not all(g.done for g in gens):
        peak = max(peak, engine.load()["running"])
        time.sleep(0.001)
    assert [g.text() for g in gens] == [outputs[k] for k in keys]
    assert peak >= 4, f"at most {peak} rows ran together"


def test_the_same_seed_gives_the_same_text_alone_and_in_a_batch(engine, adapters):
    params = [SamplingParams(temperature=0.9, top_p=0.8, top_k=20, max_new_tokens=20, seed=s) for s in (1, 2, 3)]
    alone = [text(engine, weights=adapters["a"] if i == 1 else None, params=p) for i, p in enumerate(params)]
    noise = [engine.submit(Request(f"noise {i} " * (i + 1), SamplingParams(temperature=1.0, max_new_tokens=30)))
             for i in range(4)]
    together = [engine.submit(Request.make(PROMPT, weights=adapters["a"] if i == 1 else None, params=p))
                for i, p in enumerate(params)]
    assert [g.text() for g in together] == alone
    assert all(g.text() for g in noise)


def test_a_short_request_joins_and_leaves_without_waiting_for_a_long_one(engine):
    long = engine.submit(Request(PROMPT, SamplingParams(temperature=0, max_new_tokens=400)))
    pieces = iter(long)
    next(pieces)  # the long one is decoding
    short = engine.submit(Request("Hello", SamplingParams(temperature=0, max_new_tokens=4)))
    assert short.wait(60) and short.metrics["output_token_count"] == 4
    assert not long.done, "the short request waited for the long one"
    long.cancel()
    assert long.wait(30)


def test_each_row_keeps_its_own_stops_and_lengths(engine):
    full = text(engine, params=SamplingParams(temperature=0, max_new_tokens=30))
    stop = full[10:14]
    gens = [
        engine.submit(Request(PROMPT, SamplingParams(temperature=0, max_new_tokens=30, stop_sequences=stop))),
        engine.submit(Request(PROMPT, SamplingParams(temperature=0, max_new_tokens=7))),
        engine.submit(Request(PROMPT, SamplingParams(temperature=0, max_new_tokens=30))),
    ]
    assert gens[0].text() == full[: full.index(stop)] and gens[0].metrics["stop_reason"] == "stop_sequence"
    assert gens[1].text() == text(engine, params=SamplingParams(temperature=0, max_new_tokens=7))
    assert gens[2].text() == full


def test_a_full_queue_refuses_and_a_blocking_submit_waits(tiny_model_dir):
    small = EmbeddedEngine(str(tiny_model_dir), device="cpu", precision="fp32", max_batch=1, max_queue=2)
    try:
        long = SamplingParams(temperature=0, max_new_tokens=300)
        first = small.submit(Request(PROMPT, long))
        next(iter(first))  # running: the batch of one is full
        queued = [small.submit(Request(PROMPT, long)) for _ in range(2)]
        with pytest.raises(EngineBusy, match="queue holds 2"):
            small.submit(Request(PROMPT, long))
        for gen in (first, *queued):
            gen.cancel()
        late = small.submit(Request(PROMPT, SamplingParams(temperature=0, max_new_tokens=2)), block=True)
        assert late.text()
    finally:
        small.close()
    with pytest.raises(TuneryError, match="closed"):
        small.submit(Request(PROMPT, GREEDY))


def test_one_shot_predict_reuses_the_loaded_base(adapters, outputs, monkeypatch):
    monkeypatch.setattr(predict_module, "_LAST", None)
    monkeypatch.setenv("TUNERY_ENGINE", "embedded")
    # The base comes from the adapter's config (the tiny model's directory).
    assert predict(PROMPT, weights=str(adapters["a"]), temperature=0, max_new_tokens=16) == outputs["a"]
    cached = predict_module._LAST
    assert predict(PROMPT, weights=str(adapters["b"]), temperature=0, max_new_tokens=16) == outputs["b"]
    assert predict_module._LAST is cached and cached.base_loads == 1


@pytest.mark.parametrize("length", [9, 24])  # 36 tokens: a step's fp32 products; 96: a prefill's, in the base dtype
def test_batched_lora_computes_what_peft_computes_for_each_row(tiny_model_dir, adapters, length):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from tunery.infer.lora_batch import BatchedLora, Plan

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_dir), str(adapters["a"]),
                                      adapter_name="a").eval()
    model.load_adapter(str(adapters["b"]), adapter_name="b")
    ids = torch.randint(5, 500, (4, length), generator=torch.Generator().manual_seed(0))
    names = ["b", "__base__", "a", "b"]
    with torch.no_grad():
        expected = []
        for row, name in zip(ids, names, strict=True):
            if name == "__base__":
                with model.disable_adapter():
                    expected.append(model(input_ids=row[None]).logits[0])
            else:
                model.set_adapter(name)
                expected.append(model(input_ids=row[None]).logits[0])
        batched = BatchedLora(model)
        assert batched.supports("a") and batched.supports("b")
        batched.plan = Plan(("a", "b"), torch.tensor([1, -1, 0, 1]))
        got = model(input_ids=ids).logits
        batched.plan = None
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the adapters do change the output
    for row in range(4):
        assert torch.allclose(got[row], expected[row], atol=1e-5), (names[row], (got[row] - expected[row]).abs().max())
    # q/k/v and gate/up share one A product per decoder layer; o and down have their own.
    sizes = sorted(len(group) for group in batched._groups)
    layers = len(model.base_model.model.model.layers)
    assert sizes == [1] * (2 * layers) + [2] * layers + [3] * layers, sizes


def test_batched_lora_layers_of_a_group_fed_other_inputs_compute_their_own(tiny_model_dir, adapters):
    """The shared A product is reused only for the very input it was computed from."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from tunery.infer.lora_batch import BatchedLora, Plan

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_dir), str(adapters["a"]),
                                      adapter_name="a").eval()
    attention = model.base_model.model.model.layers[0].self_attn
    hidden = attention.q_proj.in_features
    x, other = torch.randn(2, 3, hidden, generator=torch.Generator().manual_seed(1)).unbind(0)
    x, other = x[None], other[None]
    with torch.no_grad():
        expected_q, expected_k = attention.q_proj(x), attention.k_proj(other)
        expected_v = attention.v_proj(x.clone().mul_(2))
        assert not torch.allclose(expected_k, attention.k_proj.base_layer(other), atol=1e-4)  # LoRA adds something
        batched = BatchedLora(model)
        batched.plan = Plan(("a",), torch.tensor([0]))
        assert torch.allclose(attention.q_proj(x), expected_q, atol=1e-5)
        x.mul_(2)  # the same tensor, changed in place since q's product
        assert torch.allclose(attention.v_proj(x), expected_v, atol=1e-5)
        # another tensor (views of one tensor: its version counter is x's, so only identity tells them apart)
        assert torch.allclose(attention.k_proj(other), expected_k, atol=1e-5)
        batched.plan = None


def test_top_k_top_p_sampling_draws_from_transformers_filtered_distribution():
    """A batch's rows each draw, from their own seed, from the distribution transformers' warpers
    (temperature, top-k, top-p) give for that row."""
    from types import SimpleNamespace

    import torch
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from tunery.infer.embedded import _sample_rows

    torch.manual_seed(0)
    logits = torch.randn(3, 300) * 3
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9), SamplingParams(temperature=1.2, top_k=50, top_p=0.5),
              SamplingParams(temperature=0.7, top_k=20, top_p=1.0)]
    reference = []
    for row, p in zip(logits, params, strict=True):
        scores = row.unsqueeze(0)
        for warper in (TemperatureLogitsWarper(p.temperature), TopKLogitsWarper(p.top_k), TopPLogitsWarper(p.top_p)):
            scores = warper(None, scores)
        reference.append(torch.softmax(scores[0], -1))
    counts = torch.zeros(3, 300)
    draws = 600
    for seed in range(draws):
        rows = [SimpleNamespace(gen=SimpleNamespace(request=SimpleNamespace(params=p)), produced=1, eos=set(),
                                generator=torch.Generator().manual_seed(seed * 3 + i)) for i, p in enumerate(params)]
        for i, token in enumerate(_sample_rows(logits, rows)):
            counts[i, token] += 1
    for i in range(3):
        assert (reference[i][counts[i] > 0] > 0).all(), f"row {i} drew a token the warpers filter out"
        total_variation = 0.5 * (counts[i] / draws - reference[i]).abs().sum()
        assert total_variation < 0.1, (i, total_variation)


@pytest.mark.parametrize("sharpness", [8.0, 2.0, 0.05])  # the nucleus in the top 64, in the top 1024, beyond
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_without_top_k_keeps_what_transformers_keeps_without_a_sort(sharpness, top_p):
    """OpenAI's requests carry top_p and no top_k: the kept tokens, found from the largest 64 or
    1024 scores (or the whole sort when the nucleus is wider), are transformers' top-p set."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from tunery.infer.embedded import _NUCLEUS_HEADS, _nucleus, _sample

    torch.manual_seed(int(sharpness * 100 + top_p * 10))
    scores = torch.randn(6000) * sharpness
    kept = TopPLogitsWarper(top_p)(None, scores.unsqueeze(0).clone())[0] > float("-inf")
    nucleus = _nucleus(scores, top_p)
    if nucleus is None:
        assert int(kept.sum()) > _NUCLEUS_HEADS[-1] * 0.5, "the fallback sort was taken for a narrow nucleus"
    else:
        values, indices = nucleus
        assert set(indices.tolist()) == set(kept.nonzero().flatten().tolist())
        assert torch.equal(values, scores[indices]) and bool((values[:-1] >= values[1:]).all())
    params = SamplingParams(temperature=1.0, top_k=0, top_p=top_p)
    drawn = {_sample(scores, params, torch.Generator().manual_seed(seed)) for seed in range(200)}
    assert all(bool(kept[t]) for t in drawn)
