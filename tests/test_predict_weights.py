"""resolve_weights on every accepted layout, and its errors. File layouts only, no model."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from tunery.errors import TuneryError
from tunery.infer.weights import Weights, resolve_weights
from tunery.settings import Settings

BASE = {"name": "smollm2-135m", "kind": "registry", "path": "/cache/smollm2-135m", "sha256": "ab" * 32}


def write(path: Path, data: dict | str = "{}") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def make_run(root: Path, method: str = "lora", manifest: bool = True) -> Path:
    """A run directory as training leaves it (weights replaced by empty placeholders)."""
    if manifest:
        write(root / "manifest.json", {"base": BASE, "inputs": {}, "peft_method": method})
    if method == "full":
        write(root / "model" / "config.json", {"model_type": "llama"})
    else:
        write(root / "adapter" / "adapter_config.json", {"base_model_name_or_path": "/somewhere/base"})
        write(root / "adapter" / "adapter_model.safetensors", "")
    write(root / "tokenizer" / "tokenizer_config.json")
    return root


def zip_dir(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return archive


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home")


def test_run_directory_with_adapter(tmp_path, settings):
    run = make_run(tmp_path / "run")
    w = resolve_weights(run, settings)
    assert w == Weights(
        "adapter", run / "adapter", run / "tokenizer", "smollm2-135m", BASE["sha256"], str(run)
    )


def test_runs_adapter_folder_passed_directly_uses_the_run(tmp_path, settings):
    run = make_run(tmp_path / "run")
    w = resolve_weights(str(run / "adapter"), settings)
    assert (w.kind, w.path, w.tokenizer, w.base) == (
        "adapter",
        run / "adapter",
        run / "tokenizer",
        "smollm2-135m",
    )


def test_full_finetune_run(tmp_path, settings):
    run = make_run(tmp_path / "run", method="full")
    w = resolve_weights(run, settings)
    assert (w.kind, w.path, w.tokenizer, w.base) == ("full", run / "model", run / "tokenizer", "smollm2-135m")


def test_run_without_manifest_takes_base_from_adapter_config(tmp_path, settings):
    run = make_run(tmp_path / "run", manifest=False)
    w = resolve_weights(run, settings)
    assert (w.kind, w.base, w.base_sha256) == ("adapter", "/somewhere/base", None)


def test_bare_adapter_directory(tmp_path, settings):
    adapter = tmp_path / "my-adapter"
    write(adapter / "adapter_config.json", {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M"})
    w = resolve_weights(adapter, settings)
    assert (w.kind, w.path, w.tokenizer, w.base) == ("adapter", adapter, None, "HuggingFaceTB/SmolLM2-135M")
    write(adapter / "tokenizer_config.json")
    assert resolve_weights(adapter, settings).tokenizer == adapter


def test_archive_is_extracted_once_under_its_hash(tmp_path, settings, monkeypatch):
    archive = zip_dir(make_run(tmp_path / "run"), tmp_path / "training_output.zip")
    first = resolve_weights(archive, settings)
    assert first.kind == "adapter" and first.base == "smollm2-135m"
    extracted = first.path.parent
    assert extracted.parent == settings.home / "weights" and len(extracted.name) == 64
    assert (extracted / "adapter" / "adapter_config.json").is_file()

    def no_second_extraction(*args, **kwargs):
        raise AssertionError("the archive was extracted twice")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", no_second_extraction)
    assert resolve_weights(str(archive), settings) == Weights(
        first.kind, first.path, first.tokenizer, first.base, first.base_sha256, str(archive)
    )


def test_archive_with_a_top_level_folder(tmp_path, settings):
    archive = zip_dir(make_run(tmp_path / "run"), tmp_path / "out.zip", prefix="run/")
    w = resolve_weights(archive, settings)
    assert w.kind == "adapter" and w.path.name == "adapter" and w.path.parent.name == "run"


def test_archive_without_adapter_says_what_it_holds(tmp_path, settings):
    run = make_run(tmp_path / "run")
    for p in (run / "adapter").iterdir():
        p.unlink()
    (run / "adapter").rmdir()
    archive = zip_dir(run, tmp_path / "training_output.zip")
    with pytest.raises(TuneryError, match=r"archive .*training_output\.zip.* no adapter.*at its root") as e:
        resolve_weights(archive, settings)
    assert "manifest.json" in str(e.value) and "tokenizer/" in str(e.value)


def test_archive_with_unsafe_member_is_refused(tmp_path, settings):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(TuneryError, match="unsafe member"):
        resolve_weights(archive, settings)
    assert not list((settings.home / "weights").iterdir())  # no half-extracted leftovers


def test_lora_manifest_without_adapter(tmp_path, settings):
    run = tmp_path / "run"
    write(run / "manifest.json", {"base": BASE, "peft_method": "qlora"})
    with pytest.raises(TuneryError, match=r"peft_method 'qlora' needs adapter/adapter_config\.json"):
        resolve_weights(run, settings)


def test_full_manifest_without_model(tmp_path, settings):
    run = tmp_path / "run"
    write(run / "manifest.json", {"base": BASE, "peft_method": "full"})
    with pytest.raises(TuneryError, match=r"full fine-tune but has no model/config\.json"):
        resolve_weights(run, settings)


def test_missing_path_is_named(tmp_path, settings):
    missing = tmp_path / "nowhere" / "run"
    with pytest.raises(TuneryError, match="no such file or directory") as e:
        resolve_weights(str(missing), settings)
    assert str(missing) in str(e.value)


@pytest.mark.parametrize("content", ["not a zip", ""])
def test_plain_file_is_not_weights(tmp_path, settings, content):
    f = write(tmp_path / "weights.bin", content)
    with pytest.raises(TuneryError, match="not a zip archive"):
        resolve_weights(f, settings)


def test_unrecognised_directory(tmp_path, settings):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TuneryError, match="is not a run directory"):
        resolve_weights(tmp_path / "empty", settings)


def test_empty_weights_string(settings):
    with pytest.raises(TuneryError, match="empty path"):
        resolve_weights("  ", settings)


def test_corrupt_manifest_names_the_file(tmp_path, settings):
    run = make_run(tmp_path / "run")
    write(run / "manifest.json", "{not json")
    with pytest.raises(TuneryError, match="manifest.json"):
        resolve_weights(run, settings)
