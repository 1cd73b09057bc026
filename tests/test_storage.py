"""Runs in object storage, against a real S3 server (moto's, on loopback: `scripts/s3.sh start`).

Two workers with homes of their own (no shared disk) on one PostgreSQL and one bucket: the one
running a training is killed with SIGKILL after a checkpoint reached the bucket, and the other
resumes it from the bucket and succeeds. Then an API server with a third, empty home predicts on
the trained version (its weights are only in the bucket) and serves the weights archive. A
storage that cannot be reached, or a bucket that does not exist, stops `tunery worker` at start
with one line, leaving nothing behind.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import write_jsonl
from test_worker import wait_for
from tunery.artifacts import Run, Storage, check_storage
from tunery.artifacts import TrainingJob as Job
from tunery.artifacts.run import ARCHIVE, EVENTS
from tunery.errors import TuneryError
from tunery.server.replicate.shapes import webhook_body
from tunery.settings import Settings
from tunery.store import Store, base_version_id
from tunery.store.testing import PG_SKIP_REASON, fresh_database, pg_url
from tunery.worker.runner import Worker

S3_ENV = "TUNERY_TEST_S3_URL"
S3 = os.environ.get(S3_ENV)
pytestmark = pytest.mark.skipif(
    not S3, reason=f"object-storage tests need {S3_ENV}: run `export {S3_ENV}=$(scripts/s3.sh start)`; "
    ".ci/run sets it, so these tests do run in CI.")


@pytest.fixture
def bucket(monkeypatch):
    """A new bucket on the test server; (storage URL, storage options)."""
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"tunery-{secrets.token_hex(4)}"
    s3fs.S3FileSystem(endpoint_url=S3).mkdir(name)
    return f"s3://{name}/prod", {"endpoint_url": S3}


def _storage_env(home, db_url, storage, options) -> dict:
    return {**os.environ, "TUNERY_HOME": str(home), "TUNERY_DATABASE_URL": db_url, "TUNERY_STORAGE_URL": storage,
            "TUNERY_STORAGE_OPTIONS": json.dumps(options), "TUNERY_LEASE_SECONDS": "3",
            "TUNERY_PUBLIC_URL": "http://tunery.test"}


def test_a_training_moves_between_machines_through_the_bucket(tmp_path, bucket, qa_rows, tiny_model_dir):
    if pg_url() is None:
        pytest.skip(PG_SKIP_REASON)
    storage, options = bucket
    with fresh_database("postgresql", tmp_path) as db_url:
        store = Store(db_url, base_url="http://tunery.test", webhook_body=webhook_body)
        store.ensure_base_models([("tiny", None, str(tiny_model_dir))])
        store.create_model("alice", "dest")
        # The data is in the bucket too: neither worker can read the other's disk.
        local = write_jsonl(tmp_path / "train.jsonl", qa_rows)
        data_url = Storage(storage, options).put(local, "data/t/train.jsonl")
        inputs = {"train_data": "https://example.com/train.jsonl", "max_steps": 20, "save_steps": 5,
                  "num_validation_samples": 4, "run_validation": False, "logging_steps": 1}
        job = Job(inputs=inputs, data={"train_data": data_url}, base=str(tiny_model_dir))
        training = store.create_training("alice", model="tunery/tiny", version_id=base_version_id("tiny"),
                                         destination="alice/dest", input=inputs, job=job.model_dump())
        run_url = f"{storage}/trainings/{training.id}"

        victim_home, heir_home, api_home = (tmp_path / n for n in ("victim", "heir", "api"))
        code = "from tunery.server.cli import worker_command; worker_command(worker_id='doomed')"
        victim = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                                  env=_storage_env(victim_home, db_url, storage, options),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        watcher = Run(run_url, cache=tmp_path / "watch", options=options)
        try:
            wait_for(lambda: any(watcher.checkpoint_complete(n) for n in watcher.checkpoint_names()),
                     180, "a complete checkpoint in the bucket")
        finally:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
        row = store.load_training(training.id)
        assert (row.status, row.lease_owner, row.run_url) == ("processing", "doomed", run_url)

        heir = Worker(store, Settings(home=heir_home, storage_url=storage, storage_options=options,
                                      lease_seconds=3), worker_id="heir", poll_interval=0.2)
        wait_for(heir.run_once, 20, "the expired lease to be claimed")
        row = store.load_training(training.id)
        assert row.status == "succeeded", row.error
        assert row.attempts == 2 and "attempt 2, resuming from the last checkpoint" in row.logs
        steps = [h["step"] for h in row.metrics["history"]]
        assert steps == sorted(set(steps)) and steps[-1] == 20
        # The heir resumed from the checkpoint it fetched from the bucket, not from any shared disk.
        assert not (heir_home / "artifacts").exists() and not (victim_home / "artifacts" / "trainings").exists()
        events = [json.loads(line) for line in watcher.read_bytes(EVENTS).decode().splitlines()]
        resumed = [e["message"] for e in events if e["type"] == "log" and e["message"].startswith("resuming from")]
        assert len(resumed) == 1 and "checkpoint-" in resumed[0]
        assert events[-1]["type"] == "succeeded"
        manifest = watcher.read_manifest()
        assert manifest["inputs"] == inputs  # the user's inputs as given, not the resolved ones
        dest = store.get_model("alice", "alice", "dest")
        version = store.latest_version(dest.id)
        assert version.run_url == run_url
        store.close()

        # A server on a third machine: the weights exist only in the bucket.
        from test_api_support import LiveServer

        server = LiveServer(api_home, database_url=db_url, storage_url=storage, storage_options=options)
        try:
            with server.client("alice") as alice:
                made = alice.post("/v1/predictions", headers={"Prefer": "wait"}, json={
                    "version": version.id, "input": {"prompt": "Item: the red cat.\nAnimal:",
                                                      "max_new_tokens": 4, "temperature": 0}})
                assert made.status_code in (200, 201), made.text
                prediction = made.json()
                if prediction["status"] not in ("succeeded", "failed"):
                    prediction = wait_for(lambda: (p := alice.get(f"/v1/predictions/{prediction['id']}").json())
                                          ["status"] in ("succeeded", "failed") and p, 120, "the prediction")
                assert prediction["status"] == "succeeded", prediction.get("error")
                assert "".join(prediction["output"]).strip()
                weights = alice.get(f"/v1/trainings/{training.id}/weights")
                assert weights.status_code == 200, weights.text
                assert weights.content == watcher.read_bytes(ARCHIVE)
                names = zipfile.ZipFile(io.BytesIO(weights.content)).namelist()
                assert "adapter/adapter_config.json" in names and "manifest.json" in names
        finally:
            server.server.should_exit = True
            server.thread.join(30)


def test_a_storage_that_cannot_be_used_stops_the_worker_at_start(tmp_path, bucket):
    storage, options = bucket
    db_url = f"sqlite:///{tmp_path / 'tunery.db'}"
    for url, opts, reason in [
        (storage, {"endpoint_url": "http://127.0.0.1:9"}, "Could not connect"),  # nothing listens there
        ("s3://no-such-bucket-here/prod", options, "NoSuchBucket"),
    ]:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "tunery.cli", "worker"], env=_storage_env(tmp_path / "home", db_url, url, opts),
                              capture_output=True, text=True, timeout=120)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1 and lines[0].startswith(f"error: storage {url} is not usable"), done.stderr
        assert reason in lines[0] or "bucket" in lines[0].lower(), lines[0]
        assert time.monotonic() - started < 110
    # The probe object of the storage that worked is never left behind.
    check_storage(storage, options)
    import s3fs

    assert s3fs.S3FileSystem(endpoint_url=S3).ls(storage.removeprefix("s3://").split("/")[0]) == []


def test_a_run_in_storage_is_whole_or_absent_locally(tmp_path, bucket):
    storage, options = bucket
    run = Run(f"{storage}/trainings/x", cache=tmp_path / "a", options=options)
    (run.work / "adapter").mkdir(parents=True)
    (run.work / "adapter" / "adapter_config.json").write_text("{}")
    run.write_manifest({"output": "adapter"})
    run.push("adapter")
    # Another machine's cache: fetched once, into place whole.
    other = Run(run.url, cache=tmp_path / "b", options=options)
    local = other.local_weights()
    assert (local / "adapter" / "adapter_config.json").read_text() == "{}"
    assert not [p for p in local.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    with pytest.raises(TuneryError, match="no tokenizer in storage|no training_output.zip in storage"):
        other.pull(ARCHIVE)


def test_the_cli_trains_into_the_bucket_and_predicts_and_evaluates_from_it(tmp_path, bucket, qa_rows,
                                                                          tiny_model_dir):
    storage, options = bucket
    data = write_jsonl(tmp_path / "train.jsonl", qa_rows)
    test = write_jsonl(tmp_path / "test.jsonl", qa_rows[:4])
    url = f"{storage}/cli/run-1"
    env = {**os.environ, "TUNERY_STORAGE_OPTIONS": json.dumps(options)}

    def tunery(*args, home):
        done = subprocess.run([sys.executable, "-m", "tunery.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=600, env={**env, "TUNERY_HOME": str(home)})
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    trained = tunery("train", "--base", tiny_model_dir, "--train-data", data, "--max-steps", 3,
                     "--num-validation-samples", 4, "-o", url, "--no-progress", home=tmp_path / "laptop")
    assert f"done {url}" in trained.stderr
    run = Run(url, cache=tmp_path / "look", options=options)
    assert run.read_manifest()["output"] == "adapter" and run.has_archive()
    assert run.checkpoint_names() and all(run.checkpoint_complete(n) for n in run.checkpoint_names())
    # Another machine: predicts and evaluates from the bucket alone; the report lands beside the run.
    other = tmp_path / "other"
    said = tunery("predict", "--prompt", "Item: the red cat.\nAnimal:", "--weights", url, "--temperature", 0,
                  "--max-new-tokens", 3, home=other)
    assert said.stdout.strip()
    tunery("eval", "--test-data", test, "--weights", url, "--compare", "--json", home=other)
    report = json.loads(run.read_bytes("eval.json"))
    assert report["rows"] == 4 and {"base", "tuned"} <= set(report["columns"])
    # One checkpoint of the run, by its URL: its adapter and the run's tokenizer, fetched alone.
    from tunery.infer.weights import resolve_weights
    from tunery.settings import Settings

    name = run.checkpoint_names()[-1]
    weights = resolve_weights(f"{url}/checkpoints/{name}", Settings(home=tmp_path / "third",
                                                                   storage_options=options))
    assert weights.kind == "adapter" and weights.path.name == name and (weights.path / "adapter_config.json").is_file()
    assert weights.tokenizer is not None and weights.tokenizer.name == "tokenizer" and weights.base_sha256


def test_wrong_credentials_stop_the_worker_at_start(tmp_path):
    """A second S3 server that checks credentials (moto's, with authentication on from the first
    request): keys it does not know are refused, and the worker says so in one line."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 30, "the S3 server")
        env = {**_storage_env(tmp_path / "home", f"sqlite:///{tmp_path / 'db.sqlite'}", "s3://any-bucket/prod",
                              {"endpoint_url": endpoint}),
               "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1", "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_DEFAULT_REGION": "us-east-1"}
        done = subprocess.run([sys.executable, "-m", "tunery.cli", "worker"], env=env, capture_output=True, text=True,
                              timeout=120)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith("error: storage s3://any-bucket/prod is not usable: "), lines[0]
        assert "Access Key Id you provided does not exist" in lines[0], lines[0]
    finally:
        server.terminate()
        server.wait(10)
