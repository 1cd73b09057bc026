"""Base model resolution: every accepted form, and one-line errors listing what was tried."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tunery.errors import ModelNotFoundError
from tunery.models import resolve
from tunery.models.registry import smollm2_gguf_path
from tunery.models.resolve import check_base, probe_base, resolve_base
from tunery.settings import Settings


def test_local_directory(tiny_model_dir):
    r = resolve_base(str(tiny_model_dir))
    assert r.kind == "dir" and r.path == str(tiny_model_dir.resolve()) and len(r.sha256) == 64
    assert resolve_base(str(tiny_model_dir)).sha256 == r.sha256  # content hash is stable


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, tiny_model_dir):
    """A Hugging Face hub cache (the hub's own layout: refs/main naming a snapshot folder) holding
    the tiny Llama as "meta-llama/Llama-2-7b-hf"; returns that snapshot folder."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--meta-llama--Llama-2-7b-hf"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return snapshot


def test_hf_id_in_the_cache_resolves_to_its_snapshot(hf_cache):
    r = resolve_base("meta-llama/Llama-2-7b-hf")
    assert (r.kind, r.path, r.source) == ("hf", str(hf_cache), "hf:meta-llama/Llama-2-7b-hf")


def test_registry_name_maps_to_hub_id(hf_cache):
    r = resolve_base("llama-2-7b")
    assert (r.kind, r.path) == ("hf", str(hf_cache))
    assert check_base("llama-2-7b") == "hf"


@pytest.mark.parametrize("check", [resolve_base, check_base])
def test_registry_model_not_downloaded_is_one_line(check):
    with pytest.raises(ModelNotFoundError) as info:
        check("llama-2-7b")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("base model 'llama-2-7b': meta-llama/Llama-2-7b-hf is not downloaded")
    assert "hf download meta-llama/Llama-2-7b-hf" in message


def test_embedded_default_is_found():
    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


@pytest.mark.parametrize(
    "name, expected",
    [
        ("no-such-model", ["unknown base model 'no-such-model'", "not a registered name", "no local directory",
                           "not a Hugging Face id"]),
        ("/nope/model.gguf", ["no GGUF file at /nope/model.gguf"]),
    ],
)
def test_unknown_base_lists_every_attempt(name, expected):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_base(name)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_base(str(tmp_path))


def test_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf model"):
        resolve_base(str(f))


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    """A copy of the tiny Llama this test may change or delete."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", model_cache_dir=tmp_path / "cache")


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """The files whose bytes resolve_base reads to hash them, in order."""
    calls: list[Path] = []
    real = resolve.sha256_file

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(resolve, "sha256_file", counting)
    return calls


def test_content_hash_is_computed_once_per_file_version(model_copy, settings, hashed):
    weights = model_copy / "model.safetensors"
    first = resolve_base(str(model_copy), settings)
    assert hashed == [weights] and len(first.sha256) == 64
    hashed.clear()

    assert resolve_base(str(model_copy), settings).sha256 == first.sha256
    assert hashed == []  # the second start reads no weight file

    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: same bytes
    assert resolve_base(str(model_copy), settings).sha256 == first.sha256
    assert hashed == [weights]
    hashed.clear()

    with open(weights, "ab") as f:
        f.write(b"changed")
    assert resolve_base(str(model_copy), settings).sha256 != first.sha256
    assert hashed == [weights]
    cache = json.loads((settings.model_cache / resolve.HASH_CACHE).read_text())
    assert cache[str(weights.resolve())]["size"] == weights.stat().st_size


def test_check_base_reads_no_weights(model_copy, settings, hashed):
    assert check_base(str(model_copy), settings) == "dir"
    assert hashed == []


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: shutil.rmtree(d), "no local directory"),
        (lambda d: (d / "model.safetensors").unlink(), "has no weight files"),
        (lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "has no tokenizer"),
        (lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": "model-00001.safetensors", "b": "model.safetensors"}})),
         "lacks weight files listed in model.safetensors.index.json: model-00001.safetensors"),
    ],
    ids=["deleted", "no-weights", "no-tokenizer", "missing-shard"],
)
def test_unloadable_directory_is_refused_in_one_line(model_copy, settings, damage, reason):
    resolve_base(str(model_copy), settings)  # loadable, and registered, until:
    damage(model_copy)
    for check in (check_base, resolve_base):
        with pytest.raises(ModelNotFoundError) as info:
            check(str(model_copy), settings)
        assert reason in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ModelNotFoundError) as info:
        check_base(str(model_copy), settings, label="tunery/mine")
    assert str(info.value).startswith("base model tunery/mine: ") and reason in str(info.value)
    if reason == "no local directory":  # a path names only what the path lacks
        assert "Hugging Face" not in str(info.value)


def test_gguf_that_is_not_one(tmp_path, settings):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelNotFoundError, match="is not a GGUF file"):
        check_base(str(fake), settings)


def test_storage_url_is_downloaded_once(model_copy, settings):
    url = model_copy.as_uri()
    assert check_base(url, settings) == "url"
    assert not list(settings.model_cache.glob("url-*"))  # the check downloads nothing
    r = resolve_base(url, settings)
    assert r.kind == "url" and r.source == url and Path(r.path).parent == settings.model_cache
    assert r.sha256 == resolve_base(str(model_copy), settings).sha256  # the same bytes
    assert (Path(r.path) / "model.safetensors").is_file()
    shutil.rmtree(model_copy)  # from now on only the downloaded copy exists
    assert resolve_base(url, settings) == r
    assert check_base(url, settings) == "url"
    probe_base(r)


@pytest.mark.parametrize(
    "url, reason",
    [
        ("nope://bucket/model", "the storage scheme nope:// is not known to fsspec"),
        ("file:///no/such/dir", "no model directory at file:///no/such/dir"),
    ],
)
def test_bad_storage_urls(url, reason, settings):
    for check in (check_base, resolve_base):
        with pytest.raises(ModelNotFoundError) as info:
            check(url, settings)
        assert reason in str(info.value)
    assert not settings.model_cache.exists() or not list(settings.model_cache.iterdir())


def test_url_without_config(tmp_path, settings):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_base((tmp_path / "empty").as_uri(), settings)
    assert not settings.model_cache.exists() or not list(settings.model_cache.iterdir())


def test_probe_loads_config_and_tokenizer(model_copy, settings):
    r = resolve_base(str(model_copy), settings)
    probe_base(r)
    (model_copy / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError) as info:
        probe_base(r)
    assert str(info.value).startswith(f"base model {str(model_copy)!r}: cannot load it: ")
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_gguf_converted_once_then_fast(tmp_path):
    """The embedded GGUF: first resolve converts (cached as safetensors), later ones are instant."""
    import time

    from tunery.models.load import load_model, load_tokenizer

    r = resolve_base("smollm2-135m")
    assert r.kind == "registry" and (r.path and len(r.sha256) == 64)
    t = time.perf_counter()
    again = resolve_base("smollm2-135m")
    assert again == r and time.perf_counter() - t < 0.5
    t = time.perf_counter()
    model = load_model(r, precision="fp32")
    load_s = time.perf_counter() - t
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert load_s < 5  # reading cached safetensors, not dequantizing again (~30 s)
    tok = load_tokenizer(r)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


@pytest.mark.parametrize(("precision", "compute"), [("auto", "float32"), ("fp32", "float32"), ("bf16", "bfloat16")])
def test_qlora_computes_in_the_models_dtype(tiny_model_dir, precision, compute):
    """On a CPU "auto" is fp32 for 4-bit layers too: bf16 matmuls without bf16 hardware were
    20× slower (7.5 vs 146.5 tokens/s for SmolLM2 QLoRA on a 2-core AVX2 machine)."""
    import bitsandbytes as bnb
    import torch

    from tunery.models.load import load_model

    model = load_model(resolve_base(str(tiny_model_dir)), precision=precision, quantize_4bit=True, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {str(m.compute_dtype).removeprefix("torch.") for m in layers} == {compute}
    assert model.config.quantization_config.bnb_4bit_compute_dtype == getattr(torch, compute)


def test_one_gguf_parse_reads_the_file_once_for_config_and_tokenizer(monkeypatch):
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    made = []

    class Counting(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            made.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    path = smollm2_gguf_path()
    with resolve.one_gguf_parse():
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert made == [str(path)]
    assert config.num_hidden_layers == 30 and len(tok) == 49152
    assert gguf.GGUFReader is Counting  # the package's own names are back after the block
    AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    assert len(made) == 2
