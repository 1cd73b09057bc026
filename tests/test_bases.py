"""Operators' own base models: registered through the admin API and through `tunery bases`,
listed in /v1/models, trained and predicted like the built-in ones; a base that can not be
loaded is refused when a training is created, in one line, before anything is queued."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_jsonl
from test_api_models import assert_problem
from test_api_support import LiveServer
from tunery.store.models import Model, Training, Version
from tunery.store.store import Store, base_version_id


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("api-bases"), start_workers=True, admin_owners="root, ops")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def root(server):
    with server.client("root") as client:
        yield client


@pytest.fixture(scope="module")
def alice(server):
    with server.client("alice") as client:
        client.post("/v1/models", json={"owner": "alice", "name": "dest"}).raise_for_status()
        yield client


@pytest.fixture(scope="module")
def data_url(alice, tmp_path_factory):
    rows = [{"prompt": f"Item: the {c} cat.\nColor:", "completion": f" {c}"}
            for c in ["red", "blue", "green", "black"] * 4]
    path = write_jsonl(tmp_path_factory.mktemp("data") / "data.jsonl", rows)
    with open(path, "rb") as f:
        return alice.post("/v1/files", files={"content": ("data.jsonl", f, "application/jsonl")}).json()["urls"]["get"]


def copy_model(tiny_model_dir: Path, where: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, where))


def train(client, model: str, version: str, data_url: str):
    return client.post(
        f"/v1/models/{model}/versions/{version}/trainings",
        json={"destination": "alice/dest", "input": {
            "train_data": data_url, "max_steps": 2, "num_validation_samples": 4, "chunk_size": 64,
            "train_batch_size": 2, "micro_batch_size": 2}},
    )


def wait_training(client, training_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        t = client.get(f"/v1/trainings/{training_id}").json()
        if t["status"] in ("succeeded", "failed", "canceled"):
            return t
        assert time.monotonic() < deadline, t
        time.sleep(0.5)


def predict(client, version: str) -> dict:
    body = {"version": version, "input": {"prompt": "Item: the red cat.\nColor:", "max_new_tokens": 4,
                                          "temperature": 0}}
    p = client.post("/v1/predictions", json=body, headers={"Prefer": "wait=60"}).json()
    assert p["status"] == "succeeded", p
    return p


def test_only_admins_register_bases(server, alice, tiny_model_dir, tmp_path):
    before = server.count(Model)
    body = {"name": "mine", "source": str(tiny_model_dir)}
    problem = assert_problem(alice.post("/v1/bases", json=body), 403)
    assert "'alice' is not an administrator" in problem["detail"] and "TUNERY_ADMIN_OWNERS" in problem["detail"]
    assert_problem(alice.get("/v1/bases"), 403)
    assert_problem(alice.delete("/v1/bases/mine"), 403)
    assert server.count(Model) == before


def test_no_admins_by_default(tmp_path, tiny_model_dir):
    live = LiveServer(tmp_path / "home")
    try:
        with live.client("root") as root:
            problem = assert_problem(root.post("/v1/bases", json={"name": "x", "source": str(tiny_model_dir)}), 403)
        assert "none is set" in problem["detail"]
    finally:
        live.stop()


def test_register_train_and_predict_a_base(server, root, alice, data_url, tiny_model_dir, tmp_path):
    source = copy_model(tiny_model_dir, tmp_path / "my-llama")
    created = root.post("/v1/bases", json={"name": "my-llama", "source": str(source), "description": "ours"})
    assert created.status_code == 201, created.text
    base = created.json()
    assert base["model"] == "tunery/my-llama" and base["source"] == str(source)
    assert base["kind"] == "dir" and len(base["sha256"]) == 64 and base["registered_by"] == "owner:root"
    version = base["version"]

    # Listed with the built-in bases, with its version, to everyone.
    models = {m["name"]: m for m in alice.get("/v1/models", params={"limit": 1000}).json()["results"]}
    assert models["my-llama"]["latest_version"]["id"] == version
    assert models["my-llama"]["owner"] == "tunery" and models["my-llama"]["description"] == "ours"
    assert "smollm2-135m" in models
    listed = root.get("/v1/bases").json()["results"]
    assert [(b["name"], b["version"], b["source"]) for b in listed] == [("my-llama", version, str(source))]

    # Taken names: a registered one, a built-in one.
    for name in ("my-llama", "smollm2-135m"):
        assert_problem(root.post("/v1/bases", json={"name": name, "source": str(source)}), 409)

    # Predicted and trained like a built-in base; the tuned version predicts too.
    assert "".join(predict(alice, version)["output"])
    created = train(alice, "tunery/my-llama", version, data_url)
    assert created.status_code == 201, created.text
    training = wait_training(alice, created.json()["id"])
    assert training["status"] == "succeeded", training["logs"]
    assert training["model"] == "tunery/my-llama"
    tuned = training["output"]["version"]
    assert "".join(predict(alice, tuned)["output"])
    with server.store.session() as s:
        assert s.get(Version, tuned.split(":")[1]).base_name == str(source)


def test_a_base_that_does_not_load_is_not_registered(server, root, tmp_path, tiny_model_dir):
    before = server.count(Model)
    no_tokenizer = copy_model(tiny_model_dir, tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    for source, reason in [
        (str(no_tokenizer), "has no tokenizer"),
        (str(tmp_path / "nowhere"), "no local directory"),
        ("nope://bucket/model", "is not known to fsspec"),
    ]:
        problem = assert_problem(root.post("/v1/bases", json={"name": "broken", "source": source}), 422)
        assert problem["detail"].startswith("cannot register base 'broken': ") and reason in problem["detail"]
        assert "\n" not in problem["detail"]
    assert_problem(root.post("/v1/bases", json={"name": "Bad Name", "source": str(tiny_model_dir)}), 422)
    assert server.count(Model) == before


def test_an_unloadable_base_is_refused_when_the_training_is_created(server, root, alice, data_url, tiny_model_dir,
                                                                      tmp_path):
    source = copy_model(tiny_model_dir, tmp_path / "going")
    version = root.post("/v1/bases", json={"name": "going", "source": str(source)}).json()["version"]
    shutil.rmtree(source)
    trainings, downloads = server.count(Training), server.settings.download_dir
    listed = set(downloads.iterdir()) if downloads.exists() else set()

    problem = assert_problem(train(alice, "tunery/going", version, data_url), 422)
    assert problem["detail"] == f"base model tunery/going: no local directory {source}"
    # A registry model whose weights were never downloaded: the same, before anything is queued.
    problem = assert_problem(train(alice, "tunery/llama-2-7b", base_version_id("llama-2-7b"), data_url), 422)
    assert problem["detail"].startswith("base model tunery/llama-2-7b: meta-llama/Llama-2-7b-hf is not downloaded")
    assert "\n" not in problem["detail"]
    assert server.count(Training) == trainings
    assert (set(downloads.iterdir()) if downloads.exists() else set()) == listed


def test_remove_a_base(server, root, alice, tiny_model_dir):
    version = root.post("/v1/bases", json={"name": "short-lived", "source": str(tiny_model_dir)}).json()["version"]
    assert alice.get("/v1/models/tunery/short-lived").status_code == 200
    assert root.delete("/v1/bases/short-lived").status_code == 204
    assert_problem(alice.get("/v1/models/tunery/short-lived"), 404)
    assert_problem(alice.get(f"/v1/models/tunery/short-lived/versions/{version}"), 404)
    assert_problem(root.delete("/v1/bases/short-lived"), 404)
    assert_problem(root.delete("/v1/bases/smollm2-135m"), 404)  # built-in bases stay
    assert alice.get("/v1/models/tunery/smollm2-135m").status_code == 200


# -- the CLI ---------------------------------------------------------------------------------

def tunery(args: list[str], home: Path, code: int = 0) -> subprocess.CompletedProcess:
    env = os.environ | {"TUNERY_HOME": str(home)}
    env.pop("TUNERY_DATABASE_URL", None)
    result = subprocess.run([sys.executable, "-m", "tunery.cli", *args], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == code, result.stdout + result.stderr
    return result


def test_cli_bases(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    source = copy_model(tiny_model_dir, tmp_path / "cli-llama")
    added = tunery(["bases", "add", "cli-llama", str(source), "--description", "from the CLI"], home).stdout
    ref, kind, where, _, sha = added.split()
    assert ref.startswith("tunery/cli-llama:") and (kind, where) == ("dir", str(source)) and len(sha) == 64
    remote = tunery(["bases", "add", "remote-llama", source.as_uri()], home).stdout.split()
    assert remote[1:3] == ["url", source.as_uri()] and remote[4] == sha  # downloaded: the same bytes

    store = Store(f"sqlite:///{home / 'tunery.db'}")
    try:
        model = store.get_model("anyone", "tunery", "cli-llama")
        assert model is not None and model.description == "from the CLI" and model.registered_by.startswith("cli:")
        assert store.latest_version(model.id).id == ref.split(":")[1]
    finally:
        store.close()

    listed = tunery(["bases", "list"], home).stdout.splitlines()
    assert listed == [f"{remote[0]}  {source.as_uri()}", f"{ref}  {source}  from the CLI"]

    empty = tmp_path / "empty"
    empty.mkdir()
    for args, reason in [
        (["bases", "add", "broken", str(empty)], f"the directory {empty} has no config.json"),
        (["bases", "add", "cli-llama", str(source)], "base model tunery/cli-llama already exists"),
        (["bases", "remove", "smollm2-135m"], "no registered base tunery/smollm2-135m"),
    ]:
        failed = tunery(args, home, code=2)
        assert reason in failed.stderr and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert tunery(["bases", "remove", "cli-llama"], home).stdout.strip() == "removed tunery/cli-llama"
    assert tunery(["bases", "list"], home).stdout.splitlines() == [f"{remote[0]}  {source.as_uri()}"]


def test_cli_train_on_a_base_that_is_not_downloaded_is_one_line(tmp_path, qa_rows):
    data = write_jsonl(tmp_path / "data.jsonl", qa_rows)
    failed = tunery(["train", "--base", "llama-2-7b", "--train-data", str(data), "-o", str(tmp_path / "run")],
                    tmp_path / "home", code=2)
    assert "Traceback" not in failed.stderr
    # The CLI tries the hub (no network to it here), then says so in one line.
    [line] = failed.stderr.strip().splitlines()
    assert line.startswith("error: base model 'llama-2-7b': meta-llama/Llama-2-7b-hf is not downloaded and "
                           "fetching it from the Hugging Face hub failed ("), line
    assert line.endswith("; download it with `hf download meta-llama/Llama-2-7b-hf`, or register a local copy "
                         "with `tunery bases add NAME DIRECTORY`"), line


def test_registered_source_is_what_the_worker_gets(server, root, alice, tiny_model_dir, data_url):
    """The queued job carries the source itself: a trainer or engine on any machine resolves it
    without the name."""
    version = root.post("/v1/bases", json={"name": "job-base", "source": str(tiny_model_dir)}).json()["version"]
    created = train(alice, "tunery/job-base", version, data_url).json()
    assert server.store.load_training(created["id"]).job["base"] == str(tiny_model_dir.resolve())
    alice.post(f"/v1/trainings/{created['id']}/cancel")


@pytest.mark.slow
def test_register_a_gguf_file(tmp_path):
    """A .gguf base is dequantized once into the model cache; its version resolves to that copy."""
    from tunery.models.registry import smollm2_gguf_path
    from tunery.models.resolve import resolve_base
    from tunery.service.bases import register_base
    from tunery.settings import get_settings

    store = Store(f"sqlite:///{tmp_path / 'tunery.db'}")
    try:
        gguf = smollm2_gguf_path()
        base = register_base(store, get_settings(), name="smol-gguf", source=str(gguf), description=None,
                             registered_by="cli:test")
        assert (base["kind"], base["source"]) == ("gguf", str(gguf)) and len(base["sha256"]) == 64
        assert Path(base["path"]).parent == get_settings().model_cache
        model = store.get_model("anyone", "tunery", "smol-gguf")
        assert resolve_base(store.latest_version(model.id).base_name).path == base["path"]
    finally:
        store.close()
