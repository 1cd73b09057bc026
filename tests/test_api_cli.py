"""The service's commands: `serve_command` in a subprocess, and the client sub-apps
(`trainings ...`, `predictions create`) against a live server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from test_api_support import LiveServer, ScriptedEngine, free_port
from tunery.client.commands import predictions_app, trainings_app
from tunery.store.store import base_version_id

PIECES = ["One", " two", "\nthree"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("api-cli"))
    live.store.ensure_base_models([("fake", "scripted", "fake-base")])
    live.runner.use_engine("fake-base", ScriptedEngine(PIECES))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def env(server):
    server.store.create_model("alice", "dest")
    return {"TUNERY_URL": server.url, "TUNERY_TOKEN": server.store.create_token("alice")}


def run(app, args: list[str], env: dict[str, str], code: int = 0):
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == code, result.output
    return result


def test_trainings_commands(server, env, tmp_path, qa_rows):
    data = write_jsonl(tmp_path / "data.jsonl", qa_rows)
    created = run(
        trainings_app,
        [
            "create",
            "--base",
            "smollm2-135m",
            "--destination",
            "alice/dest",
            "--train-data",
            str(data),
            "--max-steps",
            "2",
            "-i",
            "num_validation_samples=4",
            "-i",
            "run_validation=false",
        ],
        env,
    )
    training_id = created.output.strip()
    training = server.store.load_training(training_id)
    assert training.input["train_data"].startswith(server.url + "/v1/files/")  # uploaded first
    assert training.input["run_validation"] is False and training.input["max_steps"] == 2

    listed = run(trainings_app, ["list"], env).output
    assert training_id in listed and "starting" in listed
    got = json.loads(run(trainings_app, ["get", training_id], env).output)
    assert got["id"] == training_id and got["destination"] == "alice/dest"
    assert run(trainings_app, ["cancel", training_id], env).output.strip() == f"{training_id} canceled"
    follow = run(trainings_app, ["logs", training_id, "--follow"], env, code=1)
    assert "canceled" in follow.output


def test_trainings_create_reports_the_servers_errors(env, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a"}', "nope"])
    result = run(
        trainings_app,
        [
            "create",
            "--version",
            f"tunery/smollm2-135m:{base_version_id('smollm2-135m')}",
            "--destination",
            "alice/dest",
            "--train-data",
            str(bad),
        ],
        env,
        code=2,
    )
    assert "HTTP 422" in result.output and "bad.jsonl:1" in result.output.replace(": ", ":")
    result = run(trainings_app, ["list"], {"TUNERY_URL": env["TUNERY_URL"], "TUNERY_TOKEN": "wrong"}, code=2)
    assert "HTTP 401" in result.output


@pytest.mark.parametrize("stream", [False, True])
def test_predictions_create(env, stream):
    args = ["create", "--version", "tunery/fake", "--prompt", "hi"] + (["--stream"] if stream else [])
    assert run(predictions_app, args, env).output == "".join(PIECES) + "\n"


def test_serve_command_starts_the_api(tmp_path):
    port = free_port()
    code = "import typer; from tunery.server.cli import serve_command; typer.run(serve_command)"
    environ = os.environ | {"TUNERY_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "--port",
            str(port),
            "--workers",
            "0",
            "--database-url",
            f"sqlite:///{tmp_path / 'db.sqlite'}",
        ],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        assert (tmp_path / "db.sqlite").exists()
    finally:
        proc.terminate()
        proc.wait(30)


def test_models_create(server, env):
    from tunery.cli import models_app

    out = run(models_app, ["create", "alice/summarizer", "--description", "SAMSum summaries"], env).output
    model = json.loads(out)
    assert (model["owner"], model["name"], model["visibility"]) == ("alice", "summarizer", "private")
    assert server.store.get_model("alice", "alice", "summarizer") is not None
    taken = run(models_app, ["create", "alice/summarizer"], env, code=2).output
    assert "HTTP 409" in taken
    wrong = run(models_app, ["create", "bob/x"], env, code=2).output
    assert "HTTP 422" in wrong
