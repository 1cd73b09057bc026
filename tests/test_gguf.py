"""GGUF export: written from a real model folder, read back by llama.cpp itself (llama-cpp-python,
which `make setup-dev` builds where a C++ toolchain is) and by transformers' own GGUF loader."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

from tunery.export import ExportError
from tunery.export import gguf as gguf_export
from tunery.export.gguf import QUANTS, write_gguf
from tunery.export.gguf_check import READERS, check_gguf, default_reader
from tunery.export.gguf_vocab import QWEN2_SPLIT

# Each reader; llama.cpp's only where llama-cpp-python is installed (scripts/llamacpp.sh).
BY_READER = pytest.mark.parametrize("reader", [
    pytest.param(r, marks=pytest.mark.skipif(r == "llama.cpp" and default_reader() != "llama.cpp",
                                             reason="llama-cpp-python is not installed (scripts/llamacpp.sh)"))
    for r in READERS])

TEXTS = [
    "Hello world! How are you today?",
    "def f(x):\n    return x * 2  # doubled",
    "Numbers 12345 and 3.14, emoji 🙂 and accents: café.",
    "<|im_start|>user\nHi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A merged-style model folder (weights, config, tokenizer, chat template) from the tiny Llama,
    its q/k projections scaled up so attention is far from uniform: with the random init's small
    weights every position attends almost evenly, and a wrong rotary layout would barely show."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    out = tmp_path_factory.mktemp("merged")
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, merged_dir) -> dict[str, tuple[Path, dict]]:
    folder = tmp_path_factory.mktemp("gguf")
    written = {}
    for quant in QUANTS:
        path = folder / f"model-{quant}.gguf"
        written[quant] = (path, write_gguf(merged_dir, path, quant=quant))
    return written


# transformers' loader parses the whole file three times (config, weights, tokenizer: about 20 s on
# a 2-core CPU for this tiny model), so where llama.cpp (the reader users run) reads every quant,
# transformers reads one file of each kind of block: float, 8-bit, 4-bit.
TRANSFORMERS_QUANTS = ("f32", "q8_0", "q4_0")
READ_BACK = [(q, r) for r in READERS for q in QUANTS
             if r == "llama.cpp" or q in TRANSFORMERS_QUANTS or default_reader() != "llama.cpp"]


@pytest.mark.parametrize(("quant", "reader"), [
    pytest.param(q, r, marks=pytest.mark.skipif(r == "llama.cpp" and default_reader() != "llama.cpp",
                                                reason="llama-cpp-python is not installed (scripts/llamacpp.sh)"))
    for q, r in READ_BACK])
def test_reads_back_within_tolerance(exports, merged_dir, quant, reader):
    import gguf

    path, info = exports[quant]
    assert info["quant"] == quant and info["architecture"] == "llama"
    assert info["vocab_size"] == 49152 and info["bytes"] == path.stat().st_size
    assert info["tensors"] == 1 + 2 * 9 + 1  # embedding, 9 per block, final norm; tied: no output.weight
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    if quant not in ("f32", "f16", "bf16", "q8_0"):  # 4/5 bits: the matrices, but the embedding stays Q8_0
        assert types["blk.0.ffn_down.weight"] == quant.upper() and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    result = check_gguf(path, merged_dir, reader=reader)
    print(quant, result)
    assert result["reader"] == reader
    assert result["max_abs_diff"] <= result["tolerance"]
    assert result["argmax_agreement"] >= result["min_argmax_agreement"]
    assert result["tokenizer_match"]
    if quant == "f32":
        assert result["max_abs_diff"] < 1e-4


def test_file_layout(exports, merged_dir):
    """What llama.cpp reads: names, per-tensor types, hyperparameters, tokenizer keys."""
    import gguf

    config = json.loads((merged_dir / "config.json").read_text())
    reader = gguf.GGUFReader(exports["q8_0"][0])
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    fields = reader.fields

    def value(key):
        return fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == config["num_hidden_layers"]
    assert value("llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert value("llama.rope.dimension_count") == config["head_dim"]
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.bos_token_id") == config["bos_token_id"]
    assert value("tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    assert value("tokenizer.ggml.add_bos_token") is False
    tokens, token_types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert tokens[2] == "<|im_end|>" and token_types[2] == gguf.TokenType.CONTROL
    assert len(value("tokenizer.ggml.merges")) > 40000


def test_tokenizer_and_chat_template_round_trip(exports, merged_dir):
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(merged_dir)
    path = exports["f16"][0]
    loaded = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        assert loaded(text)["input_ids"] == original(text)["input_ids"], text
    assert original.chat_template and loaded.chat_template == original.chat_template
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_deterministic_bytes(exports, merged_dir, tmp_path):
    for quant in ("f16", "q8_0"):
        again = tmp_path / f"again-{quant}.gguf"
        write_gguf(merged_dir, again, quant=quant)
        assert _sha256(again) == _sha256(exports[quant][0])


@BY_READER
def test_missing_rotary_permutation_is_caught(merged_dir, tmp_path, monkeypatch, reader):
    """The check can fail: a file written without llama.cpp's q/k layout does not pass."""
    monkeypatch.setattr(gguf_export, "permute_rotary", lambda weights, n_head: weights)
    path = tmp_path / "unpermuted.gguf"
    write_gguf(merged_dir, path, quant="f32")
    with pytest.raises(ExportError, match=f"does not read back in {reader}") as err:
        check_gguf(path, merged_dir, reader=reader)
    assert "\n" not in str(err.value)


def test_unreadable_file_is_reported(merged_dir, tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf at all")
    with pytest.raises(ExportError, match="not a readable GGUF") as err:
        check_gguf(bogus, merged_dir)
    assert "\n" not in str(err.value)


@BY_READER
def test_corrupted_tensor_is_caught(merged_dir, tmp_path, monkeypatch, reader):
    real = gguf_export._convert

    def corrupt(t, data, permute):
        if t.gguf_name == "blk.1.ffn_down.weight":
            data = data * 1.5
        return real(t, data, permute)

    monkeypatch.setattr(gguf_export, "_convert", corrupt)
    path = tmp_path / "corrupt.gguf"
    write_gguf(merged_dir, path, quant="f16")
    with pytest.raises(ExportError, match="does not read back"):
        check_gguf(path, merged_dir, reader=reader)


def test_unsupported_architecture_is_refused_before_writing(tmp_path, merged_dir):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    shutil.copy(merged_dir / "tokenizer.json", folder / "tokenizer.json")
    out = tmp_path / "out.gguf"
    with pytest.raises(ExportError) as err:
        write_gguf(folder, out)
    message = str(err.value)
    assert "\n" not in message and "'gpt2'" in message and "llama" in message
    assert list(tmp_path.glob("*.gguf")) == [] and not list(tmp_path.glob(".out.gguf*"))


def test_non_bpe_tokenizer_and_missing_files_are_refused(tmp_path, merged_dir):
    folder = tmp_path / "m"
    shutil.copytree(merged_dir, folder)
    out = tmp_path / "out.gguf"
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["type"] = "Unigram"
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ExportError, match="not BPE"):
        write_gguf(folder, out)
    tokenizer["model"].update(type="BPE", byte_fallback=True)  # SentencePiece-style: the scores are needed
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ExportError, match="no tokenizer.model, whose piece scores"):
        write_gguf(folder, out)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="no tokenizer.json"):
        write_gguf(folder, out)
    shutil.copy(merged_dir / "tokenizer.json", folder / "tokenizer.json")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="no model.safetensors"):
        write_gguf(folder, out)
    with pytest.raises(ExportError, match="unknown GGUF quant"):
        write_gguf(merged_dir, out, quant="q4_k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_failure_mid_write_leaves_nothing(merged_dir, tmp_path, monkeypatch):
    real = gguf_export._convert
    seen = []

    def failing(t, data, permute):
        seen.append(t.gguf_name)
        if len(seen) == 5:
            raise RuntimeError("disk on fire")
        return real(t, data, permute)

    monkeypatch.setattr(gguf_export, "_convert", failing)
    out = tmp_path / "model.gguf"
    out_old = tmp_path / "keep.gguf"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_gguf(merged_dir, out, quant="f16")
    assert len(seen) == 5
    assert list(tmp_path.iterdir()) == []
    # An earlier export at the same path survives a failed rewrite untouched.
    monkeypatch.setattr(gguf_export, "_convert", real)
    write_gguf(merged_dir, out_old, quant="q8_0")
    digest = _sha256(out_old)
    seen.clear()
    monkeypatch.setattr(gguf_export, "_convert", failing)
    with pytest.raises(RuntimeError):
        write_gguf(merged_dir, out_old, quant="f16")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.gguf"] and _sha256(out_old) == digest


@pytest.mark.slow
def test_default_base_q8_0(tmp_path):
    """SmolLM2-135M, the default base (its safetensors cache, converted once from the shipped GGUF)."""
    from tunery.models.resolve import resolve_base

    base = Path(resolve_base("smollm2-135m").path)
    assert (base / "model.safetensors").is_file()
    start = time.monotonic()
    out = tmp_path / "smollm2-135m.q8_0.gguf"
    info = write_gguf(base, out, quant="q8_0")
    result = check_gguf(out, base)
    print("smollm2 q8_0", info, result, f"{time.monotonic() - start:.1f}s")
    assert result["argmax_agreement"] >= 0.9


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lora_adapter_gguf_matches_merged_export(merged_dir, exports, tmp_path):
    """A LoRA GGUF applied as llama.cpp applies it (W + alpha/r · B·A, per tensor, in the GGUF's
    layout) gives the tensors of the merged model's own GGUF export, q/k permutation included."""
    import gguf
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunery.export.gguf import write_lora_gguf

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    merged = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(merged_dir / name, merged / name)

    info = write_lora_gguf(adapter, tmp_path / "adapter.gguf", merged_dir, quant="f32")
    assert info["alpha"] == 8.0 and info["ranks"] == [4] and info["tensors"] == 2 * 7 * 2
    write_gguf(merged, tmp_path / "merged.gguf", quant="f32")

    def tensors(path):
        reader = gguf.GGUFReader(path)
        return reader, {t.name: np.array(t.data) for t in reader.tensors}

    lora_reader, lora = tensors(tmp_path / "adapter.gguf")
    _, base = tensors(exports["f32"][0])
    _, merged_t = tensors(tmp_path / "merged.gguf")
    assert lora_reader.fields["general.type"].contents() == "adapter"
    assert lora_reader.fields["adapter.type"].contents() == "lora"
    scale = lora_reader.fields["adapter.lora.alpha"].contents() / 4
    checked = 0
    for name in sorted(merged_t):
        if f"{name}.lora_a" not in lora:
            assert np.array_equal(merged_t[name], base[name]), name
            continue
        applied = base[name] + scale * lora[f"{name}.lora_b"] @ lora[f"{name}.lora_a"]
        assert np.allclose(applied, merged_t[name], atol=1e-5), name
        assert not np.allclose(base[name], merged_t[name], atol=1e-3), name
        checked += 1
    assert checked == 2 * 7

    config = json.loads((adapter / "adapter_config.json").read_text())
    config["use_dora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="DoRA"):
        write_lora_gguf(adapter, tmp_path / "dora.gguf", merged_dir)
    assert not (tmp_path / "dora.gguf").exists()


def test_mistral_is_written_as_llama(tmp_path, merged_dir):
    """llama.cpp runs Mistral as its Llama architecture; the file reads back with Mistral's logits."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    llama = json.loads((merged_dir / "config.json").read_text())
    torch.manual_seed(2)
    config = MistralConfig(
        vocab_size=llama["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, sliding_window=None,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2, rope_theta=50000.0,
    )
    model = MistralForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    folder = tmp_path / "mistral"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(merged_dir / name, folder / name)
    out = tmp_path / "mistral.gguf"
    info = write_gguf(folder, out, quant="f32")
    assert info["model_type"] == "mistral" and info["tensors"] == 1 + 2 * 9 + 1 + 1  # untied: output.weight
    result = check_gguf(out, folder)
    assert result["max_abs_diff"] < 1e-4


def test_qwen2_with_its_pre_tokenizer(tmp_path, merged_dir):
    """Qwen2: its own architecture (biases on q/k/v, no q/k permutation) and pre-tokenizer name."""
    import gguf
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    llama = json.loads((merged_dir / "config.json").read_text())
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=llama["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    ))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
            layer.self_attn.q_proj.bias.normal_(0, 0.5)
            layer.self_attn.k_proj.bias.normal_(0, 0.5)
    folder = tmp_path / "qwen"
    model.save_pretrained(folder)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(merged_dir / name, folder / name)
    tokenizer = json.loads((merged_dir / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = tmp_path / "qwen.gguf"
    info = write_gguf(folder, out, quant="f16")
    assert info["architecture"] == "qwen2" and info["tensors"] == 1 + 2 * 12 + 1
    result = check_gguf(out, folder)
    assert result["max_abs_diff"] <= result["tolerance"] and result["tokenizer_match"]
    original = AutoTokenizer.from_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in [*TEXTS, "a\n\nb"]:
        assert loaded(text)["input_ids"] == original(text)["input_ids"], text
    # The split this name stands for is really in use: GPT-2's splits the blank line apart.
    assert original("a\n\nb")["input_ids"] != AutoTokenizer.from_pretrained(merged_dir)("a\n\nb")["input_ids"]
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "qwen2"


@BY_READER
def test_linear_rope_scaling_is_written_and_other_scalings_refused(tmp_path, merged_dir, reader):
    """Linear RoPE scaling goes into the two keys llama.cpp reads (the file reads back with the
    scaled model's logits); YaRN, LongRoPE and dynamic scaling are refused in one line, before any
    file is opened."""
    import gguf

    folder = tmp_path / "scaled"
    shutil.copytree(merged_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    config["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": theta}
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "scaled.gguf"
    write_gguf(folder, out, quant="f32")
    fields = gguf.GGUFReader(out).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 4.0
    result = check_gguf(out, folder, reader=reader)
    assert result["max_abs_diff"] <= result["tolerance"] and result["argmax_agreement"] == 1.0
    # The same file without the keys reads back as a different model: the check sees scaling.
    unscaled = tmp_path / "unscaled"
    shutil.copytree(merged_dir, unscaled)
    with pytest.raises(ExportError, match="does not read back"):
        check_gguf(out, unscaled, reader=reader)
    for rope_type in ("yarn", "longrope", "dynamic"):
        config["rope_parameters"] = {"rope_type": rope_type, "factor": 4.0, "rope_theta": theta,
                                     "original_max_position_embeddings": 512}
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ExportError, match=f"rope scaling '{rope_type}' is not supported") as err:
            write_gguf(folder, tmp_path / "refused.gguf")
        assert "\n" not in str(err.value) and not (tmp_path / "refused.gguf").exists()
