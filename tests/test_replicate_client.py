"""Seed 003's guide ("Fine-tune a language model"), step by step, with the OFFICIAL `replicate`
client against a live tunery server with an embedded worker and the tiny random Llama:
create a model, upload data, create a training, reload() until it succeeds, run and stream the
new version, list and cancel trainings, and check a signed webhook."""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
import zipfile

import httpx
import pytest
import replicate
from replicate.exceptions import ReplicateError

from conftest import write_jsonl
from test_api_support import LiveServer
from tunery.store.store import base_version_id

TERMINAL = ("succeeded", "failed", "canceled")
TINY = base_version_id("tiny")


class Hooks(http.server.BaseHTTPRequestHandler):
    """Records every POST it receives (headers, body) into the server's `received` list."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["content-length"])).decode()
        self.server.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hooks():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    httpd.received = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    live = LiveServer(tmp_path_factory.mktemp("replicate-client"), start_workers=True)
    live.store.ensure_base_models([("tiny", "a tiny random Llama", str(tiny_model_dir))])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server, monkeypatch_module):
    monkeypatch_module.setenv("REPLICATE_POLL_INTERVAL", "0.2")
    return replicate.Client(api_token=server.store.create_token("alice"), base_url=server.url)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def reload_until_done(training, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while training.status not in TERMINAL:
        assert time.monotonic() < deadline, (
            f"training still {training.status} after {timeout}s:\n{training.logs}"
        )
        time.sleep(0.5)
        training.reload()
    return training


def test_the_fine_tuning_guide(server, client, hooks, tmp_path, qa_rows):
    # "Create a model": an empty destination model.
    model = client.models.create(
        owner="alice", name="llama2-summarizer", visibility="private", hardware="cpu"
    )
    assert (model.owner, model.name, model.latest_version) == ("alice", "llama2-summarizer", None)

    # "Upload your training data".
    data = client.files.create(write_jsonl(tmp_path / "data.jsonl", qa_rows))
    assert data.size > 0 and data.urls["get"].startswith(server.url)

    # "Create a training".
    training = client.trainings.create(
        version=f"tunery/tiny:{TINY}",
        input={
            "train_data": data.urls["get"],
            "num_train_epochs": 1,
            "max_steps": 3,
            "num_validation_samples": 4,
            "train_batch_size": 2,
            "micro_batch_size": 2,
            "chunk_size": 64,
        },
        destination="alice/llama2-summarizer",
        webhook=f"http://127.0.0.1:{hooks.server_address[1]}/hook",
        webhook_events_filter=["completed"],
    )
    assert training.status == "starting" and training.model == "tunery/tiny" and training.version == TINY
    assert training.input["train_data"] == data.urls["get"]

    # "Wait for the training to finish": reload() until succeeded.
    reload_until_done(training)
    assert training.status == "succeeded", f"{training.error}\n{training.logs}"
    assert training.logs and training.completed_at
    version_ref = training.output["version"]
    assert version_ref.startswith("alice/llama2-summarizer:")
    assert client.trainings.get(training.id).output == training.output
    weights = httpx.get(training.output["weights"], headers={"Authorization": f"Bearer {client._api_token}"})
    assert "manifest.json" in zipfile.ZipFile(io.BytesIO(weights.content)).namelist()
    assert client.models.get("alice/llama2-summarizer").latest_version.id == version_ref.split(":")[1]

    # "Run the model": replicate.run gives an iterator of text pieces.
    output = client.run(
        version_ref, input={"prompt": "Item: the red cat.\nAnimal:", "max_new_tokens": 8, "temperature": 0}
    )
    text = "".join(output)
    assert isinstance(text, str) and text

    # The same with streaming: server-sent events whose str() is the text.
    events = list(
        client.stream(
            version_ref,
            input={"prompt": "Item: the red cat.\nAnimal:", "max_new_tokens": 8, "temperature": 0},
        )
    )
    assert "".join(str(e) for e in events) == text
    assert events[-1].event.value == "done"

    # And the HTTP API's way: predictions.create, then wait on urls.get.
    prediction = client.predictions.create(
        version=version_ref.split(":")[1],
        input={
            "prompt": "Item: the red cat.\nAnimal:",
            "max_new_tokens": 8,
            "temperature": 0,
            "stop_sequences": "</s>",
        },
    )
    prediction.wait()
    assert prediction.status == "succeeded" and "".join(prediction.output) == text
    assert prediction.metrics["predict_time"] > 0

    # The signed "completed" webhook, checked the way the guide's readers would.
    secret = client.webhooks.default.secret()
    deadline = time.monotonic() + 30
    while not hooks.received and time.monotonic() < deadline:
        time.sleep(0.2)
    headers, body = hooks.received[-1]
    replicate.webhooks.validate(headers=headers, body=body, secret=secret, tolerance=300)  # raises if invalid
    assert json.loads(body)["status"] == "succeeded" and json.loads(body)["id"] == training.id


def test_list_and_cancel_trainings(server, client, tmp_path, qa_rows):
    client.models.create(owner="alice", name="canceled-dest", visibility="private", hardware="cpu")
    data = client.files.create(write_jsonl(tmp_path / "data.jsonl", qa_rows))
    inputs = {
        "train_data": data.urls["get"],
        "num_validation_samples": 4,
        "num_train_epochs": 1000,
        "train_batch_size": 1,
        "micro_batch_size": 1,
        "chunk_size": 64,
    }
    running = client.trainings.create(
        version=f"tunery/tiny:{TINY}", input=inputs, destination="alice/canceled-dest"
    )
    queued = client.trainings.create(
        version=f"tunery/tiny:{TINY}", input=inputs, destination="alice/canceled-dest"
    )
    listed = client.trainings.list()
    assert {running.id, queued.id} <= {t.id for t in listed.results}

    # Queued (the one worker is busy): canceled at once.
    assert client.trainings.cancel(queued.id).status == "canceled"
    # Running: the worker stops its child within seconds.
    deadline = time.monotonic() + 120
    while running.status == "starting":
        assert time.monotonic() < deadline, "the training never started"
        time.sleep(0.5)
        running.reload()
    assert running.status == "processing"
    client.trainings.cancel(running.id)
    t0 = time.monotonic()
    reload_until_done(running, timeout=60)
    assert running.status == "canceled" and time.monotonic() - t0 < 30
    assert client.trainings.get(queued.id).status == "canceled"


def test_bad_requests_raise_replicate_errors(client):
    client.models.create(owner="alice", name="bad-dest", visibility="private", hardware="cpu")
    with pytest.raises(ReplicateError) as raised:
        client.trainings.create(
            version=f"tunery/tiny:{TINY}", input={"train_data": "x", "bogus": 1}, destination="alice/bad-dest"
        )
    assert raised.value.status == 422 and "bogus" in raised.value.detail
    with pytest.raises(ReplicateError) as raised:
        client.trainings.get("nope")
    assert raised.value.status == 404
