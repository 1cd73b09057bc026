"""Exports of a finished run: merged weights (checked against base + adapter), deterministic bytes,
QLoRA merged onto the dequantized 4-bit base, bad input refused with nothing left behind, and the
API route with its download."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import zipfile

import pytest
import torch

from conftest import write_jsonl
from tunery.artifacts import Run
from tunery.export import ExportError
from tunery.export.exporter import export, list_exports
from tunery.train.recipe import train

INPUTS = {"max_steps": 3, "num_validation_samples": 4, "learning_rate": 5e-3, "lora_dropout": 0,
          "train_batch_size": 4, "micro_batch_size": 4, "logging_steps": 1}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("export-run")
    rows = [{"prompt": f"Item: the {c} cat.\nColor:", "completion": f" {c}"} for c in ["red", "blue", "green"] * 8]
    data = write_jsonl(folder / "d.jsonl", rows)
    train({"train_data": str(data), **INPUTS}, base=str(tiny_model_dir), output_dir=folder / "run", progress=False)
    return Run(folder / "run")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_merged_export_loads_as_a_plain_model_and_reproduces_base_plus_adapter(lora_run, dtype, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done = export(lora_run, "merged", dtype=dtype, force=True)
    assert done.file == lora_run.exports / f"merged-{dtype}.zip" and done.info["relative_diff"] <= done.info["tolerance"]
    folder = lora_run.exports / "unzipped"
    shutil.rmtree(folder, ignore_errors=True)
    with zipfile.ZipFile(done.file) as zf:
        zf.extractall(folder)
    model_dir = folder / f"merged-{dtype}"
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template and tokenizer.eos_token_id in _as_list(merged.generation_config.eos_token_id)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          str(lora_run.weights_dir(False))).eval()
    ids = tokenizer("Item: the red cat.\nColor:", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = reference(input_ids=ids).logits, merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert (a - b).abs().max() <= {"f32": 1e-4, "bf16": 0.05}[dtype] * a.abs().max()
    assert (a - base).abs().max() > 10 * (a - b).abs().max()  # the adapter is in: not the base
    shutil.rmtree(folder)


def _as_list(value):
    return value if isinstance(value, list) else [value]


def test_exporting_again_gives_the_same_bytes(lora_run):
    first = _sha(export(lora_run, "merged", dtype="f32", force=True).file)
    assert _sha(export(lora_run, "merged", dtype="f32", force=True).file) == first
    assert export(lora_run, "merged", dtype="f32").file.is_file()  # an existing export is reused
    assert "merged-f32" in [e["name"] for e in list_exports(lora_run)]


def test_bad_exports_are_refused_and_leave_nothing(lora_run, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="unknown export format 'onnx': use one of merged, gguf, ollama, gguf-lora"):
        export(lora_run, "onnx")
    with pytest.raises(ExportError, match="merged dtype 'int4' is not one of bf16, f16, f32"):
        export(lora_run, "merged", dtype="int4")
    unfinished = Run(tmp_path / "half")
    (unfinished.checkpoints / "checkpoint-1").mkdir(parents=True)
    with pytest.raises(ExportError, match="has no manifest.json: a training that failed or is still running"):
        export(unfinished, "merged")
    assert not unfinished.exports.exists()
    # The disk fills up while the archive is written: one clear error, nothing under the export's name.
    before = sorted(p.name for p in lora_run.exports.iterdir())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full)
    with pytest.raises(ExportError, match="no space left on the device while exporting merged-f16"):
        export(lora_run, "merged", dtype="f16")
    assert sorted(p.name for p in lora_run.exports.iterdir()) == before


def test_a_qlora_adapter_is_merged_onto_the_dequantized_4bit_base(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"prompt": f"Item: the {c} cat.\nColor:", "completion": f" {c}"} for c in ["red", "blue", "green"] * 8]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    train({"train_data": str(data), **INPUTS, "peft_method": "qlora"}, base=str(tiny_model_dir),
          output_dir=tmp_path / "run", progress=False)
    run = Run(tmp_path / "run")
    done = export(run, "merged", dtype="f32")
    assert done.info["peft_method"] == "qlora" and done.info["relative_diff"] <= 1e-4
    with zipfile.ZipFile(done.file) as zf:
        zf.extractall(tmp_path / "x")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "x" / "merged-f32", dtype=torch.float32)
    # The same adapter merged onto the 16-bit weights (what a naive export does) is further off the
    # trained model than the export is.
    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      str(run.weights_dir(False))).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "x" / "merged-f32")
    ids = tokenizer("Item: the blue cat.\nColor:", return_tensors="pt").input_ids
    from tunery.export.merged import _base

    manifest = json.loads((run.work / "manifest.json").read_text())
    trained = PeftModel.from_pretrained(_base(manifest, None), str(run.weights_dir(False))).eval()
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - want).abs().max() < 1e-3
        assert (naive(input_ids=ids).logits - want).abs().max() > 10 * (merged(input_ids=ids).logits - want).abs().max()


def test_the_api_exports_a_succeeded_training_and_serves_the_file(lora_run, tmp_path, tiny_model_dir):
    from test_api_support import LiveServer
    from test_worker import wait_for
    from tunery.store import base_version_id

    server = LiveServer(tmp_path / "home")
    try:
        store = server.store
        store.ensure_base_models([("tiny", None, str(tiny_model_dir))])
        store.create_model("alice", "dest")
        made = [store.create_training("alice", model="tunery/tiny", version_id=base_version_id("tiny"),
                                      destination="alice/dest", input={}, job={}) for _ in range(2)]
        for training in made:
            assert store.claim_training("w", 30).id == training.id
        store.succeed_training(made[0].id, "w", run_url=lora_run.url, weights_url="u", metrics={})
        with server.client("alice") as alice:
            url = f"/v1/trainings/{made[0].id}/exports"
            bad = alice.post(url, json={"format": "onnx"})
            assert bad.status_code == 422 and "unknown export format 'onnx'" in bad.json()["detail"]
            running = alice.post(f"/v1/trainings/{made[1].id}/exports", json={"format": "merged"})
            assert running.status_code == 409
            assert running.json()["detail"] == (f"training {made[1].id} is processing: only a succeeded training "
                                                "can be exported")
            started = alice.post(url, json={"format": "merged", "dtype": "f16"})
            assert started.status_code == 202 and started.json()["name"] == "merged-f16"
            done = wait_for(lambda: next((e for e in alice.get(url).json()["results"]
                                          if e["name"] == "merged-f16" and e["status"] != "processing"), None),
                            120, "the export")
            assert done["status"] == "succeeded", done["error"]
            download = alice.get(done["urls"]["download"])
            assert download.status_code == 200
            assert download.content == (lora_run.exports / "merged-f16.zip").read_bytes()
            with server.client("bob") as bob:
                assert bob.get(done["urls"]["download"]).status_code == 404
    finally:
        server.stop()


def test_the_ollama_template_frames_reproduce_the_chat_template(tokenizer):
    from tunery.export.ollama import chat_frames, go_template, modelfile, render_frames

    frames = chat_frames(tokenizer)
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    ]
    for messages in conversations:
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_frames(frames, messages) == want
    assert frames["assistant"][1].strip() == "<|im_end|>" and frames["default_system"]  # SmolLM2's ChatML
    template = go_template(frames)
    assert template.startswith("{{ range $i, $m := .Messages }}") and template.endswith(frames["generation"])
    chat = modelfile("gguf-q8_0.gguf", tokenizer, "messages")
    assert chat.startswith("FROM ./gguf-q8_0.gguf\n") and 'PARAMETER stop "<|im_end|>"' in chat
    assert f'SYSTEM """{frames["default_system"]}"""' in chat
    raw = modelfile("gguf-q8_0.gguf", tokenizer, "prompt_completion")
    assert 'TEMPLATE """{{ .Prompt }}"""' in raw and f'PARAMETER stop "{tokenizer.eos_token}"' in raw


def test_gguf_and_ollama_exports_read_back_as_the_trained_model(lora_run):
    gguf = export(lora_run, "gguf", quant="q8_0", force=True)
    assert gguf.file == lora_run.exports / "gguf-q8_0.gguf" and gguf.file.read_bytes()[:4] == b"GGUF"
    check = gguf.info["check"]
    assert check["max_abs_diff"] <= check["tolerance"] and check["argmax_agreement"] >= 0.9
    assert _sha(export(lora_run, "gguf", quant="q8_0", force=True).file) == _sha(gguf.file)

    ollama = export(lora_run, "ollama", quant="f16", force=True)
    with zipfile.ZipFile(ollama.file) as zf:
        names = sorted(zf.namelist())
        modelfile = zf.read("ollama-f16/Modelfile").decode()
    assert names == ["ollama-f16/Modelfile", "ollama-f16/ollama-f16.gguf"]
    # The run trained on prompt/completion rows: the raw prompt, and the eos as the stop.
    assert modelfile.startswith("FROM ./ollama-f16.gguf\n") and 'TEMPLATE """{{ .Prompt }}"""' in modelfile
    assert ollama.info["ollama_create"] == "cd ollama-f16 && ollama create MODEL_NAME -f Modelfile"
    assert {e["name"] for e in list_exports(lora_run)} >= {"gguf-q8_0", "ollama-f16"}


def test_the_cli_exports_and_says_why_it_cannot(lora_run, tmp_path):
    import subprocess
    import sys

    def tunery(*args):
        return subprocess.run([sys.executable, "-m", "tunery.cli", "export", *map(str, args)], capture_output=True,
                              text=True, timeout=600)

    done = tunery(lora_run.url, "--format", "merged", "--dtype", "f32")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(lora_run.exports / "merged-f32.zip")
    assert "check: logits within" in done.stderr
    bad = tunery(lora_run.url, "--format", "onnx")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: unknown export format 'onnx': use one of merged, gguf, ollama, gguf-lora"]
    missing = tunery(tmp_path / "nothing", "--format", "gguf")
    assert missing.returncode == 2 and "has no manifest.json" in missing.stderr and "Traceback" not in missing.stderr


def test_the_adapter_alone_exports_as_a_lora_gguf(lora_run):
    done = export(lora_run, "gguf-lora", quant="f16", force=True)
    assert done.file == lora_run.exports / "gguf-lora-f16.gguf" and done.file.read_bytes()[:4] == b"GGUF"
    config = json.loads((lora_run.weights_dir(False) / "adapter_config.json").read_text())
    assert done.info["check"]["lora_tensors"] > 0 and config["peft_type"] == "LORA"
    assert "gguf-lora-f16" in {e["name"] for e in list_exports(lora_run)}
