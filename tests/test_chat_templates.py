"""The chat_template input: named templates and Jinja, checked before any compute, trained with,
saved with the run's tokenizer, and translated into Ollama templates that Go renders the same."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import write_jsonl
from tunery.chat_templates import LLAMA_2, NAMES, TEMPLATES, generation_prompt
from tunery.export.ollama import chat_frames, go_template, modelfile, render_frames

GO_RENDERER = Path(__file__).parent / "go" / "ollama_template.go"
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
]


def go_render(template: str, messages: list[dict]) -> str:
    """The prompt Ollama builds: Go's text/template over the messages."""
    done = subprocess.run(["go", "run", str(GO_RENDERER)], input=json.dumps({"template": template,
                          "messages": messages}), capture_output=True, text=True, timeout=300, check=True)
    return done.stdout


@pytest.fixture
def tok(tokenizer_dir):
    """SmolLM2's tokenizer, a copy of this test's own (the session's `tokenizer` stays as it is)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("runtime_bos", [False, True], ids=["template-bos", "runtime-bos"])
@pytest.mark.parametrize("name", NAMES)
def test_each_named_template_becomes_an_ollama_template_that_renders_the_same_prompt(tok, name, runtime_bos):
    """The same prompt the engines get, whether the template's BOS stays text (SmolLM2's tokenizer
    adds none) or is left to a runtime that adds one (Llama's: then `<s>` opens every later turn only)."""
    tok.chat_template, tok.add_bos_token = TEMPLATES[name], runtime_bos
    frames = chat_frames(tok)
    template = go_template(frames)
    for messages in CHATS:
        want = generation_prompt(tok, messages)
        assert render_frames(frames, messages) == want, messages
        if shutil.which("go"):  # CI installs it (scripts/golang.sh)
            assert go_render(template, messages) == want, (template, messages)
    assert "{{-" not in template  # no trimming: each frame's whitespace is the model's


def test_a_bos_the_tokenizer_adds_is_not_written_twice(tok):
    """SmolLM2's tokenizer adds no BOS, so the template's own stays; one that adds it loses the
    template's leading copy (in the engines' prompt and in the Ollama template alike)."""
    tok.chat_template = TEMPLATES["llama-3"]
    chat = [{"role": "user", "content": "Hi"}]
    assert generation_prompt(tok, chat).startswith(tok.bos_token)
    assert chat_frames(tok)["lead"] == tok.bos_token
    tok.add_bos_token = True
    assert tok("x").input_ids[0] == tok.bos_token_id
    assert generation_prompt(tok, chat).startswith("<|start_header_id|>user")
    assert chat_frames(tok)["lead"] == ""


def test_the_input_is_checked_before_anything_runs():
    from tunery.spec import input_errors

    [unknown] = input_errors({"train_data": "x.jsonl", "chat_template": "llama2"})
    assert unknown.field == "chat_template" and "unknown chat template 'llama2'" in unknown.reason
    assert "llama-2" in unknown.reason and "Jinja" in unknown.reason
    [broken] = input_errors({"train_data": "x.jsonl", "chat_template": "{% for m in messages %}{{ m.content }}"})
    assert broken.field == "chat_template" and "does not render a chat" in broken.reason
    assert input_errors({"train_data": "x.jsonl", "chat_template": "{{ messages[0]['content'] }}"}) == []


@pytest.fixture
def base_without_template(tmp_path, tiny_model_dir) -> Path:
    """The tiny Llama with a tokenizer that has no chat template, as base Llama 2's has none."""
    from transformers import AutoTokenizer

    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = None
    tok.save_pretrained(folder)
    assert not AutoTokenizer.from_pretrained(folder).chat_template
    return folder


def test_a_base_without_a_template_trains_chat_rows_with_one(tmp_path, base_without_template):
    from transformers import AutoTokenizer

    from tunery.errors import TuneryError
    from tunery.train.recipe import train

    rows = [{"messages": [{"role": "system", "content": "Answer with one word."},
                          {"role": "user", "content": f"Which animal is number {i}?"},
                          {"role": "assistant", "content": ["cat", "owl", "bee", "yak"][i % 4]}]} for i in range(8)]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    spec = {"train_data": str(data), "max_steps": 1, "run_validation": False, "save_steps": 1000}
    with pytest.raises(TuneryError, match="chat template"):
        train(spec, base=str(base_without_template), output_dir=tmp_path / "refused", progress=False)
    result = train({**spec, "chat_template": "llama-2"}, base=str(base_without_template),
                   output_dir=tmp_path / "run", progress=False)
    saved = AutoTokenizer.from_pretrained(result.run_dir / "tokenizer")
    assert saved.chat_template == LLAMA_2  # predictions and the OpenAI chat API read this tokenizer
    ollama = modelfile("model.gguf", saved, "messages")
    assert "[INST] {{ if $system }}<<SYS>>" in ollama and f'PARAMETER stop "{saved.eos_token}"' in ollama
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["inputs"]["chat_template"] == "llama-2"
