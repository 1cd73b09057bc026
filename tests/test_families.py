"""The family table (issue 20): tiny random models of real architectures with tokenizers of the real
kind (tests/families.py: Llama 2 and 3, Mistral, Qwen2.5 and 3, Gemma 2 and 3, Phi-3), through the
stages a user runs — train (LoRA, QLoRA, full, chat rows), predict, evaluate, export — each for the
families where it works today.

GGUF exports are read back by llama.cpp itself when llama-cpp-python is installed
(scripts/llamacpp.sh; CI builds it), and by transformers' GGUF loader in any case.

Not here, because it does not work: chat rows on Llama 2 without naming a template (base Llama 2
has none: its chat run here names `chat_template: llama-2`).
"""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch

from conftest import write_jsonl
from families import FAMILIES, make_family

TRAINABLE = FAMILIES
# Families whose chat template tunery can label multi-turn chats with.
CHAT = ("llama-3", "mistral", "qwen2.5", "qwen3", "gemma-2", "gemma-3", "phi-3")
GGUF = FAMILIES
# llama.cpp's architecture for each (Mistral runs as Llama there).
GGUF_ARCH = {"llama-2": "llama", "llama-3": "llama", "mistral": "llama", "qwen2.5": "qwen2", "qwen3": "qwen3",
             "gemma-2": "gemma2", "gemma-3": "gemma3", "phi-3": "phi3"}
SENTENCEPIECE = ("llama-2", "mistral", "gemma-2", "gemma-3", "phi-3")

ARCHITECTURES = {"llama-2": "LlamaForCausalLM", "llama-3": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2.5": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma-2": "Gemma2ForCausalLM",
                 "gemma-3": "Gemma3ForCausalLM", "phi-3": "Phi3ForCausalLM"}
# The markers each family's chat template writes, each one token of the family's vocabulary.
TURN_TOKENS = {"llama-3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "mistral": ["<s>", "</s>"], "qwen2.5": ["<|im_start|>", "<|im_end|>"],
               "qwen3": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
               "gemma-2": ["<bos>", "<start_of_turn>", "<end_of_turn>"],
               "gemma-3": ["<bos>", "<start_of_turn>", "<end_of_turn>"],
               "phi-3": ["<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]}

COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "eel", "yak"]
# One short answer to learn, so that what a tuned model says can be checked on a random base.
QA = [{"prompt": f"Item: the {COLORS[i % 8]} {ANIMALS[i * 3 % 8]}.\nAnswer:", "completion": " yes"} for i in range(24)]
PROMPT = "Item: the red cat.\nAnswer:"
# Chats of one and of two exchanges (every assistant turn trained).
CHATS = [{"messages": [{"role": "user", "content": f"Is the {COLORS[i % 8]} {ANIMALS[i * 3 % 8]} an animal?"},
                       {"role": "assistant", "content": "Yes."}]
          + ([{"role": "user", "content": f"And is it {COLORS[i % 8]}?"}, {"role": "assistant", "content": "Yes."}]
             if i % 2 else [])}
         for i in range(24)]
# Random tiny models learning a fixed answer in 12 steps: LoRA+ 16 for speed (the supervised default
# is chosen for real data by benchmarks/quality.py; the ratio is not what these tests are about).
INPUTS = {"max_steps": 12, "learning_rate": 5e-3, "lora_dropout": 0.0, "train_batch_size": 4, "micro_batch_size": 4,
          "num_validation_samples": 4, "loraplus_lr_ratio": 16}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(name): the family's model folder, built once per module."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, object] = {}

    def get(name: str):
        if name not in built:
            built[name] = make_family(name, root / name)
        return built[name]

    return get


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family-data")
    return {"qa": write_jsonl(folder / "qa.jsonl", QA), "qa_test": write_jsonl(folder / "qa_test.jsonl", QA[:6]),
            "chat": write_jsonl(folder / "chat.jsonl", CHATS),
            "chat_test": write_jsonl(folder / "chat_test.jsonl", CHATS[:6])}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, family, data):
    """trained(name, kind): a finished run of the family (kind: lora, full, qlora or chat), trained
    once per module."""
    from tunery.train.recipe import train

    root = tmp_path_factory.mktemp("family-runs")
    runs: dict[tuple[str, str], object] = {}

    def get(name: str, kind: str):
        if (name, kind) not in runs:
            inputs = {"train_data": str(data["chat" if kind == "chat" else "qa"]), **INPUTS}
            if kind in ("full", "qlora"):
                inputs["peft_method"] = kind
            if kind == "chat" and name == "llama-2":  # base Llama 2 has no template: name Meta's
                inputs["chat_template"] = "llama-2"
            runs[name, kind] = train(inputs, base=str(family(name)), output_dir=root / f"{name}-{kind}",
                                     progress=False)
        return runs[name, kind]

    return get


# --- the fixtures themselves ----------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_the_fixture_is_the_family(name, family):
    """Each folder is the family's architecture with a tokenizer of its kind, as its Hub repository
    has them: what the stages below are run on."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = family(name)
    config = AutoConfig.from_pretrained(folder)
    assert config.architectures == [ARCHITECTURES[name]]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == ARCHITECTURES[name] and model.config.vocab_size >= len(tok)
    bpe = json.loads((folder / "tokenizer.json").read_text())["model"]
    assert bpe["type"] == "BPE"
    if name in SENTENCEPIECE:
        assert bpe["byte_fallback"] and (folder / "tokenizer.model").is_file()
        assert "<0xF0>" in tok.get_vocab()  # bytes for what the vocabulary lacks
    else:
        assert not bpe["byte_fallback"] and "Ġ" in tok.get_vocab()  # byte-level: a space is Ġ
    text = "Hello world! 12345 café 🙂\n  def f(x):"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.eos_token_id is not None
    if name == "llama-2":
        assert tok.chat_template is None and tok.pad_token is None  # a base model, as Meta's
    else:
        chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
        ids = tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        for marker in TURN_TOKENS[name]:
            assert tok.convert_tokens_to_ids(marker) in ids, marker  # one token, not split
            assert len(tok(marker, add_special_tokens=False).input_ids) == 1, marker
    if name == "phi-3" or name.startswith("qwen"):
        assert model.config.vocab_size > len(tok)  # embeddings padded past the tokenizer, as theirs
    with torch.no_grad():
        logits = model(torch.tensor([tok(text).input_ids])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_the_same_name_builds_the_same_folder(tmp_path, family):
    first = family("qwen2.5")
    again = make_family("qwen2.5", tmp_path / "again")
    for file in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / file).read_bytes() == (again / file).read_bytes(), file


# --- training, predictions, evaluation ------------------------------------------------------------


def _predict(run_dir):
    """The run's greedy answer to PROMPT and why it stopped, on the embedded engine (as `tunery predict`)."""
    from tunery.infer.generation import SamplingParams
    from tunery.infer.predict import stream

    generation = stream(PROMPT, weights=run_dir, params=SamplingParams(temperature=0, max_new_tokens=5))
    return generation.text(), generation.metrics["stop_reason"]


@pytest.mark.parametrize("name", TRAINABLE)
def test_lora_trains_and_predicts_what_it_learned(name, trained):
    result = trained(name, "lora")
    adapter = result.run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    adapted = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if name == "phi-3" else {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {m.rsplit(".", 1)[-1] for m in config["target_modules"]} == adapted
    losses = [h["loss"] for h in result.manifest["metrics"]["history"] if "loss" in h]
    assert len(losses) == INPUTS["max_steps"] and losses[-1] < losses[0] / 3
    assert _predict(result.run_dir) == (" yes", "eos")


@pytest.mark.parametrize("name", TRAINABLE)
def test_full_finetune_trains_and_predicts_what_it_learned(name, trained):
    result = trained(name, "full")
    assert (result.run_dir / "model" / "model.safetensors").is_file()
    assert not (result.run_dir / "adapter").exists()
    assert _predict(result.run_dir) == (" yes", "eos")


@pytest.mark.parametrize("name", TRAINABLE)
def test_the_serving_engine_batches_the_base_and_two_adapters_together(name, trained, family):
    """One batch on the embedded engine: the bare base, the prompt/completion adapter and the chat
    adapter (peft's mixed-adapter batches); each answers as it does alone."""
    from tunery.infer.embedded import EmbeddedEngine
    from tunery.infer.generation import Request, SamplingParams

    greedy = SamplingParams(temperature=0, max_new_tokens=5)
    lora, chat = trained(name, "lora").run_dir, trained(name, "chat").run_dir
    engine = EmbeddedEngine(str(family(name)), device="cpu", precision="fp32", max_batch=8)
    try:
        alone = [engine.submit(Request.make(PROMPT, weights=w, params=greedy)).text() for w in (None, lora, chat)]
        together = engine.submit_many([Request.make(PROMPT, weights=w, params=greedy) for w in (None, lora, chat)])
        assert [g.text() for g in together] == alone
        assert alone[1] == " yes" and alone[0] != " yes"
        assert len(engine.loaded_adapters) == 2
    finally:
        engine.close()


@pytest.mark.parametrize("name", ["gemma-2", "gemma-3", "phi-3"])
def test_the_serving_engine_keeps_sliding_windows_past_their_length(name, family):
    """Sliding-window families, with the window shrunk below a prompt's length: a long prompt
    decoded in one batch with rows that join later, of other lengths, gives the tokens
    transformers' own generate gives it alone (the engine's cache keeps every row's history and
    the model's mask applies the window)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.infer.embedded import EmbeddedEngine, eos_ids
    from tunery.infer.generation import Request, SamplingParams

    tok = AutoTokenizer.from_pretrained(family(name))
    model = AutoModelForCausalLM.from_pretrained(family(name), dtype=torch.float32).eval()
    model.config.sliding_window = 24
    prompts = [" ".join(f"{COLORS[i % 8]} {ANIMALS[i * 5 % 8]}" for i in range(n)) for n in (40, 3, 17)]
    ids = [tok(p).input_ids for p in prompts]
    assert len(ids[0]) > 2 * model.config.sliding_window
    expected = []
    for one in ids:
        out = model.generate(torch.tensor([one]), max_new_tokens=12, do_sample=False,
                             eos_token_id=sorted(eos_ids(model, tok)), pad_token_id=tok.pad_token_id or 0)
        expected.append(out[0, len(one):].tolist())
    engine = EmbeddedEngine("sliding", model=model, tokenizer=tok, max_batch=8)
    try:
        params = SamplingParams(temperature=0, max_new_tokens=12)
        first = engine.submit(Request(ids[0], params))
        rest = engine.submit_many([Request(p, params) for p in ids[1:]])
        for g in [first, *rest]:
            g.text()
        got = [g.token_ids for g in [first, *rest]]
    finally:
        engine.close()
    assert got == expected


@pytest.mark.parametrize("name", TRAINABLE)
def test_qlora_trains(name, trained):
    result = trained(name, "qlora")
    assert result.manifest["peft_method"] == "qlora"
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    losses = [h["loss"] for h in result.manifest["metrics"]["history"] if "loss" in h]
    assert losses[-1] < losses[0] / 3


@pytest.mark.parametrize("name", CHAT)
def test_chat_rows_train_on_the_family_template(name, trained):
    """Chat rows are rendered with the family's own template, the loss on the assistant's answers
    through their end-of-turn marker; the run keeps the template for inference."""
    from transformers import AutoTokenizer

    from tunery.data.tokenize import tokenize_rows

    result = trained(name, "chat")
    assert result.manifest["data"]["train_data"]["format"] == "messages"
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(result.run_dir / "tokenizer")
    assert tok.chat_template == AutoTokenizer.from_pretrained(result.manifest["base"]["path"]).chat_template
    example = tokenize_rows([CHATS[1]], "messages", tok, max_length=256)[0]
    labelled = tok.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100])
    end = {"llama-3": "<|eot_id|>", "mistral": "</s>", "qwen2.5": "<|im_end|>", "gemma-2": "<end_of_turn>",
           "gemma-3": "<end_of_turn>", "qwen3": "<|im_end|>", "phi-3": "<|end|>"}[name]
    assert labelled.startswith(f"Yes.{end}Yes.{end}"), labelled
    assert "animal" not in labelled and "user" not in labelled


@pytest.mark.parametrize("name", TRAINABLE)
def test_eval_compares_base_and_tuned(name, trained, data, tmp_path):
    from tunery.eval.evaluate import evaluate

    report = evaluate(data["qa_test"], weights=trained(name, "lora").run_dir, compare=True, progress=False,
                      output_dir=tmp_path)
    assert report["columns"] == ["base", "tuned"] and report["rows"] == 6
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == report["metrics"]
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    assert tuned["exact_match"] == 1.0 and base["exact_match"] == 0.0
    assert tuned["loss"] < base["loss"] / 3


@pytest.mark.parametrize("name", CHAT)
def test_eval_on_chat_rows_answers_in_the_template(name, trained, data, tmp_path):
    """Evaluation renders each chat with the template up to the last answer and generates it,
    stopping at the family's end of turn."""
    from tunery.eval.evaluate import evaluate

    report = evaluate(data["chat_test"], weights=trained(name, "chat").run_dir, compare=True, progress=False,
                      output_dir=tmp_path)
    assert report["columns"] == ["base", "tuned"] and report["rows"] == 6
    assert report["metrics"]["tuned"]["exact_match"] == 1.0 and report["metrics"]["base"]["exact_match"] == 0.0


# --- export -----------------------------------------------------------------------------------------


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", TRAINABLE)
def test_merged_export_is_base_plus_adapter(name, trained, family, tmp_path):
    """The merged folder loads in transformers as the family's own class and gives the logits of
    base + adapter (and not the base's)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.artifacts import Run
    from tunery.export.exporter import export

    run = Run(trained(name, "lora").run_dir)
    done = export(run, "merged", dtype="f32", force=True)
    assert done.info["relative_diff"] <= done.info["tolerance"]
    with zipfile.ZipFile(done.file) as zf:
        zf.extractall(tmp_path)
    folder = tmp_path / "merged-f32"
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(merged).__name__ == ARCHITECTURES[name]
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == AutoTokenizer.from_pretrained(family(name)).chat_template
    base = AutoModelForCausalLM.from_pretrained(family(name), dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    base_logits = _logits(base, ids)
    reference = PeftModel.from_pretrained(base, str(run.weights_dir(False))).eval()
    a, b = _logits(reference, ids), _logits(merged, ids)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert (a - base_logits).abs().max() > 10 * (a - b).abs().max()  # the adapter is in
    shutil.rmtree(folder)


@pytest.mark.parametrize("name", TRAINABLE)
def test_merged_export_of_a_full_finetune(name, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunery.artifacts import Run
    from tunery.export.exporter import export

    result = trained(name, "full")
    done = export(Run(result.run_dir), "merged", dtype="f32", force=True)
    assert done.info["relative_diff"] <= done.info["tolerance"]
    with zipfile.ZipFile(done.file) as zf:
        zf.extractall(tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-f32", dtype=torch.float32)
    tuned = AutoModelForCausalLM.from_pretrained(result.run_dir / "model", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 20, 40]])
    assert torch.allclose(_logits(merged, ids), _logits(tuned, ids), atol=1e-5)


@pytest.mark.parametrize("name", GGUF)
def test_gguf_export_reads_back(name, trained, family, tmp_path):
    from tunery.artifacts import Run
    from tunery.export.exporter import export
    from tunery.export.gguf_check import check_gguf, default_reader

    run = trained(name, "lora").run_dir
    done = export(Run(run), "gguf", quant="f32", force=True)
    assert done.file.suffix == ".gguf"
    assert done.info["gguf"]["architecture"] == GGUF_ARCH[name]
    check = done.info["check"]  # read back against base + adapter, by llama.cpp where it is installed
    assert check["reader"] == default_reader()
    assert check["max_abs_diff"] <= check["tolerance"] and check["argmax_agreement"] >= check["min_argmax_agreement"]
    if check["reader"] == "llama.cpp" and name not in ("mistral", "phi-3"):
        # llama.cpp tokenizes as the model's own tokenizer does; Mistral's and Phi-3's (legacy=False)
        # put no "▁" after a special token, which llama.cpp's SentencePiece always does.
        assert check["tokenizer_match"]
    if check["reader"] == "llama.cpp":  # the adapter alone, applied by llama.cpp over the base's GGUF
        _lora_in_llama_cpp(run, family(name), done.file, tmp_path)
    # The other reader too (transformers' GGUF loader, with the keys it does not map applied),
    # against the merged model.
    merged = export(Run(run), "merged", dtype="f32", force=True)
    with zipfile.ZipFile(merged.file) as zf:
        zf.extractall(tmp_path)
    other = "transformers" if check["reader"] == "llama.cpp" else "llama.cpp"
    if other == "llama.cpp" and default_reader() != "llama.cpp":
        return  # llama-cpp-python is not installed here
    again = check_gguf(done.file, tmp_path / "merged-f32", reader=other)
    assert again["max_abs_diff"] <= again["tolerance"] and again["argmax_agreement"] >= again["min_argmax_agreement"]


def _lora_in_llama_cpp(run, base_dir, merged_gguf, tmp_path):
    """llama.cpp with the run's LoRA GGUF (`--lora`) over a GGUF of the base gives the merged GGUF's
    logits: the adapter's tensors are named, laid out and scaled as llama.cpp applies them."""
    import numpy as np
    from llama_cpp import Llama

    from tunery.artifacts import Run
    from tunery.export.exporter import export
    from tunery.export.gguf import write_gguf

    lora = export(Run(run), "gguf-lora", quant="f32", force=True)
    base = tmp_path / "base-f32.gguf"
    write_gguf(base_dir, base, quant="f32")
    logits = []
    for kwargs in ({"model_path": str(base), "lora_path": str(lora.file)}, {"model_path": str(merged_gguf)}):
        llm = Llama(**kwargs, n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0)
        ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
        llm.eval(ids)
        logits.append(np.array(llm.scores[: len(ids)]))
        llm.close()
    scale = max(1.0, float(np.abs(logits[1]).max()))
    assert np.abs(logits[0] - logits[1]).max() <= 1e-3 * scale
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).all()


def test_a_chat_the_template_refuses_is_one_line_naming_the_row(family):
    """Mistral's template raises on a system message: the row and the template's reason, no traceback."""
    from transformers import AutoTokenizer

    from tunery.data import tokenize_rows
    from tunery.errors import TuneryError

    tok = AutoTokenizer.from_pretrained(family("mistral"))
    rows = [CHATS[0], {"messages": [{"role": "system", "content": "Be brief."}, *CHATS[0]["messages"]]}]
    with pytest.raises(TuneryError, match=r"^chat row 2: the chat template refuses it: .*alternate"):
        tokenize_rows(rows, "messages", tok, max_length=256)


@pytest.mark.parametrize("name", GGUF)
def test_ollama_export_of_a_chat_run_carries_the_family_template(name, trained):
    """The chat run's GGUF and a Modelfile whose Go template is the family's chat template (checked
    against the Jinja by export/ollama.py's own rendering, and in tests/test_chat_templates.py by Go)."""
    from transformers import AutoTokenizer

    from tunery.artifacts import Run
    from tunery.chat_templates import generation_prompt
    from tunery.export.exporter import export
    from tunery.export.ollama import chat_frames, go_template, render_frames

    run = trained(name, "chat").run_dir
    done = export(Run(run), "ollama", quant="q8_0", force=True)
    with zipfile.ZipFile(done.file) as zf:
        names = {n.rsplit("/", 1)[-1] for n in zf.namelist()}
        modelfile = next(zf.read(n).decode() for n in zf.namelist() if n.endswith("Modelfile"))
    assert {"Modelfile", "ollama-q8_0.gguf"} <= names
    opening = {"llama-2": "[INST] ", "mistral": "[INST] ", "qwen2.5": "<|im_start|>user\n",
               "qwen3": "<|im_start|>user\n", "llama-3": "<|start_header_id|>user<|end_header_id|>\n\n",
               "gemma-2": "<start_of_turn>user\n", "gemma-3": "<start_of_turn>user\n", "phi-3": "<|user|>\n"}[name]
    assert 'TEMPLATE """' in modelfile and opening in modelfile
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    chat = CHATS[1]["messages"][:-1]
    frames = chat_frames(tok)
    # What the engines are given (a BOS the tokenizer adds itself left to it), as Ollama's runtime does.
    assert render_frames(frames, chat) == generation_prompt(tok, chat)
    if shutil.which("go"):  # and Go's text/template renders the Modelfile's template the same (CI has Go)
        from test_chat_templates import go_render

        messages = chat if frames["default_system"] in (None, "") else [
            {"role": "system", "content": frames["default_system"]}, *chat]  # Ollama adds SYSTEM so
        assert go_render(go_template(frames), messages) == generation_prompt(tok, chat)
