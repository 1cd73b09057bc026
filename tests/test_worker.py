"""Workers end to end on the tiny model: two workers share a queue, each training runs once in a
child process and creates a version; a killed child fails its job; a canceled job stops within seconds."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest

from conftest import write_jsonl
from tunery.artifacts import TrainingJob as Job
from tunery.server.replicate.shapes import webhook_body
from tunery.settings import Settings
from tunery.store import Store, base_version_id
from tunery.store.testing import fresh_database, pg_url
from tunery.train.events import read_events
from tunery.worker.runner import Worker


@pytest.fixture
def db_url(tmp_path):
    """PostgreSQL when the tests have one (as in CI), else a SQLite file: each training here costs
    seconds of CPU, so they run once, on the backend that matters most where they run."""
    backend = "postgresql" if pg_url() else "sqlite"
    with fresh_database(backend, tmp_path) as url:
        yield url


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", lease_seconds=3.0)


@pytest.fixture
def store(db_url, tiny_model_dir):
    s = Store(db_url, base_url="http://tunery.test", webhook_body=webhook_body)
    s.ensure_base_models([("tiny", "a tiny random Llama", str(tiny_model_dir))])
    s.create_model("alice", "dest")
    yield s
    s.close()


@pytest.fixture
def data_file(tmp_path, qa_rows):
    return write_jsonl(tmp_path / "train.jsonl", qa_rows)


def queue(store: Store, data_file, tiny_model_dir, **inputs):
    job = {"train_data": str(data_file), "max_steps": 4, "num_validation_samples": 4, "save_steps": 1,
           "logging_steps": 1, **inputs}
    given = {**job, "train_data": "file"}
    return store.create_training("alice", model="tunery/tiny", version_id=base_version_id("tiny"),
                                 destination="alice/dest", input=given,
                                 job=Job(inputs=given, data={"train_data": str(data_file)},
                                         base=str(tiny_model_dir)).model_dump())


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_two_workers_run_each_training_once(store, settings, data_file, tiny_model_dir):
    trainings = [queue(store, data_file, tiny_model_dir) for _ in range(3)]
    workers = [Worker(store, settings, worker_id=f"w{i}", poll_interval=0.1) for i in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run_forever, args=(stop,)) for w in workers]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(store.load_training(t.id).status in ("succeeded", "failed") for t in trainings),
                 150, "three trainings to finish")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(w.run_once() for w in workers)  # nothing left
    dest = store.get_model("alice", "alice", "dest")
    versions = {v.training_id: v for v in store.list_versions(dest.id).items}
    assert sorted(versions) == sorted(t.id for t in trainings)
    for training in trainings:
        _check_succeeded(store, settings, training.id, versions[training.id], tiny_model_dir)


def _check_succeeded(store, settings, training_id, version, tiny_model_dir):
    row = store.get_training("alice", training_id)
    assert row.status == "succeeded", row.error
    assert row.attempts == 1 and row.lease_owner is None and row.completed_at is not None
    assert row.output == {"weights": f"http://tunery.test/v1/trainings/{training_id}/weights",
                          "version": f"alice/dest:{version.id}"}
    run_dir = settings.artifacts_dir / "trainings" / training_id
    assert (version.run_url, version.base_name) == (str(run_dir), str(tiny_model_dir))
    assert (run_dir / "adapter").is_dir() and (run_dir / "training_output.zip").is_file()
    assert row.run_url == str(run_dir)
    assert [e["type"] for e in read_events(run_dir / "events.jsonl")].count("started") == 1

    assert re.match(r"worker w[01]: attempt 1, starting\n", row.logs) and row.logs.count("attempt 1") == 1
    assert "step 4/4 loss " in row.logs and "tok/s" in row.logs and "data: " in row.logs
    m = row.metrics
    assert (m["step"], m["max_steps"]) == (4, 4) and m["loss"] > 0 and m["val_loss"] > 0
    assert [h["step"] for h in m["history"]] == [1, 2, 3, 4]
    assert all({"loss", "learning_rate", "tokens_per_second"} <= h.keys() for h in m["history"])
    assert m["steps"] == 4 and "train_loss" in m  # the run's summary, from the succeeded event


def _run_in_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    return thread


def test_a_child_the_system_kills_is_retried_from_its_last_checkpoint(store, settings, data_file, tiny_model_dir):
    training = queue(store, data_file, tiny_model_dir, max_steps=12, save_steps=4)
    worker = Worker(store, settings, worker_id="w1")
    thread = _run_in_thread(worker)
    run = settings.training_run(training.id)
    wait_for(lambda: any(run.checkpoint_complete(n) for n in run.checkpoint_names()), 120, "a checkpoint")
    child = worker.child
    os.kill(child.pid, signal.SIGKILL)  # as the OOM killer would
    thread.join(180)
    row = store.load_training(training.id)
    assert row.status == "succeeded", row.error
    assert row.attempts == 1  # the worker went on itself: no lease had to expire
    assert "killed by SIGKILL (out of memory?); retrying from the last checkpoint (retry 1 of 2)" in row.logs
    steps = [h["step"] for h in row.metrics["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 12
    resumed = [e for e in read_events(run.events) if e["type"] == "log" and e["message"].startswith("resuming from")]
    assert len(resumed) == 1


def test_a_child_killed_past_its_retries_fails_its_training_naming_the_cause(store, settings, data_file,
                                                                            tiny_model_dir, monkeypatch):
    import tunery.worker.runner as runner

    monkeypatch.setattr(runner, "CHILD_RETRIES", 1)
    training = queue(store, data_file, tiny_model_dir, max_steps=200, save_steps=1000)
    worker = Worker(store, settings, worker_id="w1")
    thread = _run_in_thread(worker)
    killed = []
    for _ in range(2):
        child = wait_for(lambda: worker.child not in (None, *killed) and worker.child, 60, "a child to start")
        wait_for(lambda: "step 1/" in store.load_training(training.id).logs.rsplit("retrying", 1)[-1], 60,
                 "a step")
        os.kill(child.pid, signal.SIGKILL)
        killed.append(child)
    thread.join(30)
    row = store.load_training(training.id)
    assert row.status == "failed" and "killed by SIGKILL" in row.error, row.error
    assert "after 1 retries from the last checkpoint" in row.error
    assert row.lease_owner is None


def test_cancel_stops_a_running_training_within_seconds(store, settings, data_file, tiny_model_dir):
    training = queue(store, data_file, tiny_model_dir, max_steps=200, save_steps=1000)
    worker = Worker(store, settings, worker_id="w1")
    thread = _run_in_thread(worker)
    child = wait_for(lambda: worker.child, 30, "the child to start")
    wait_for(lambda: "step 1/" in store.load_training(training.id).logs, 60, "the first step")

    asked = time.monotonic()
    assert store.cancel_training("alice", training.id).status == "processing"
    wait_for(lambda: store.load_training(training.id).status == "canceled", 10, "the cancel")
    took = time.monotonic() - asked
    thread.join(10)
    assert not thread.is_alive()
    assert took < 8, took
    assert child.poll() is not None  # the training process is gone
    with pytest.raises(ProcessLookupError):
        os.killpg(child.pid, 0)  # and so is its whole process group
    row = store.load_training(training.id)
    assert row.logs.endswith("canceled\n") and row.completed_at is not None
    assert 1 <= row.metrics["step"] < 200
    events = read_events(settings.artifacts_dir / "trainings" / training.id / "events.jsonl")
    assert not any(e["type"] == "succeeded" for e in events)


def test_validation_data_is_evaluated_into_the_training_metrics(store, settings, tmp_path, qa_rows,
                                                                  tiny_model_dir):
    train_file = write_jsonl(tmp_path / "t.jsonl", qa_rows)
    val_file = write_jsonl(tmp_path / "v.jsonl", qa_rows[:5])
    training = queue(store, train_file, tiny_model_dir, validation_data=str(val_file), max_steps=2)
    assert Worker(store, settings, worker_id="w", poll_interval=0.1).run_once()
    done = store.load_training(training.id)
    assert done.status == "succeeded", done.error
    ev = done.metrics["eval"]
    assert set(ev) == {"base", "tuned"} and "exact_match" in ev["tuned"] and "loss" in ev["base"]
    assert "evaluation on" in done.logs and "exact_match" in done.logs
    assert f"evaluation on the first rows of {val_file.name}, held out (4 rows)" in done.logs


def test_a_training_without_validation_data_is_evaluated_on_its_held_out_tail(store, settings, tmp_path, qa_rows,
                                                                                tiny_model_dir):
    """Every service training is evaluated, base against tuned: without validation_data, on the
    last num_validation_samples rows of train_data (never trained on); with none held out, a log
    line says why there is no evaluation."""
    from tunery.train.events import EventSink
    from tunery.train.recipe import PreparedData, _held_out_set

    train_file = write_jsonl(tmp_path / "t.jsonl", qa_rows)
    held = queue(store, train_file, tiny_model_dir, max_steps=2)  # num_validation_samples 4
    assert Worker(store, settings, worker_id="w", poll_interval=0.1).run_once()
    done = store.load_training(held.id)
    assert done.status == "succeeded", done.error
    assert set(done.metrics["eval"]) == {"base", "tuned"} and done.metrics["eval_seconds"] > 0
    assert f"evaluation on the last rows of {train_file.name}, held out (4 rows)" in done.logs
    said: list[str] = []
    sink = EventSink()
    sink.listen(lambda event: said.append(event.get("message", "")))
    assert _held_out_set((None, None), PreparedData([], [], {}, {}, [], held_out=[]), sink) is None
    assert said and "no rows were held out for validation" in said[0]


def test_progress_keeps_data_stats_samples_and_step_times():
    import json

    from tunery.worker.progress import Progress

    events = [
        {"type": "data", "time": 1.0, "train_rows": 20, "train_tokens": 400, "padding_fraction": 0.1},
        {"type": "step", "time": 2.0, "step": 1, "loss": 2.0, "learning_rate": 1e-4, "max_steps": 2},
        {"type": "sample", "time": 2.5, "step": 1, "prompt": "p", "output": "it's \"quoted\""},
        {"type": "step", "time": 3.0, "step": 2, "loss": 1.5, "learning_rate": 5e-5, "max_steps": 2},
    ]
    p = Progress()
    p.feed_text("".join(json.dumps(e) + "\n" for e in events))
    m = p.metrics()
    assert m["data"] == {"train_rows": 20, "train_tokens": 400, "padding_fraction": 0.1}
    assert m["samples"] == [{"step": 1, "output": "it's \"quoted\""}]
    assert [h["time"] for h in m["history"]] == [2.0, 3.0]
    # a resumed attempt starts from the stored metrics and keeps them
    again = Progress(m).metrics()
    assert again["data"] == m["data"] and again["samples"] == m["samples"] and again["history"] == m["history"]


def test_writes_of_a_growing_training_are_spaced_by_its_size():
    from tunery.worker.runner import flush_interval

    assert flush_interval(0) == 1.0 and flush_interval(50_000) == 1.0  # small: every second
    assert flush_interval(500_000) == 5.0  # a 5,000-step run's logs and history: every 5 s
    assert flush_interval(50_000_000) == 10.0  # never rarer than every 10 s
    sizes = [0, 80_000, 150_000, 400_000, 900_000, 2_000_000]
    assert [flush_interval(n) for n in sizes] == sorted(flush_interval(n) for n in sizes)


def test_a_dpo_training_runs_through_the_worker(store, settings, tmp_path, tiny_model_dir):
    """A Replicate-shaped training with input method=dpo: reward metrics in the training's metrics
    and logs, and the held-out preference rate in its evaluation."""
    from test_dpo import preference_rows

    rows = preference_rows()
    train_file = write_jsonl(tmp_path / "prefs.jsonl", rows[:24])
    val_file = write_jsonl(tmp_path / "held.jsonl", rows[24:])
    training = queue(store, train_file, tiny_model_dir, method="dpo", validation_data=str(val_file), max_steps=2,
                     learning_rate=5e-3)
    assert Worker(store, settings, worker_id="w", poll_interval=0.1).run_once()
    done = store.load_training(training.id)
    assert done.status == "succeeded", done.error
    m = done.metrics
    assert [h["step"] for h in m["history"]] == [1, 2]
    assert all("reward_accuracy" in h and "reward_margin" in h for h in m["history"])
    assert "val_reward_accuracy" in m and m["reward_accuracy"] is not None
    assert set(m["eval"]) == {"base", "tuned"} and "preference_rate" in m["eval"]["tuned"]
    assert "step 2/2 loss " in done.logs and " reward acc " in done.logs and "preference_rate" in done.logs
