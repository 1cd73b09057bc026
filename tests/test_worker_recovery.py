"""Workers as processes. Nothing is lost when one dies: a worker process killed with SIGKILL
mid-training leaves the job to the next worker once its lease expires, and that worker resumes from
the last checkpoint. `tunery worker` stops on SIGTERM; `tunery tokens create` prints a token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from conftest import write_jsonl
from test_worker import wait_for
from tunery.artifacts import Run
from tunery.artifacts import TrainingJob as Job
from tunery.server.replicate.shapes import webhook_body
from tunery.settings import Settings
from tunery.store import Store, base_version_id
from tunery.train.events import read_events
from tunery.worker.runner import Worker


def _complete_checkpoint(checkpoints):
    """The first checkpoint whose trainer_state.json (written last) is whole: seeing the file is
    not enough, the kill could land while it is being written."""
    for state in sorted(checkpoints.glob("checkpoint-*/trainer_state.json")):
        try:
            json.loads(state.read_text())
        except ValueError:
            continue
        return state.parent
    return None


def test_a_killed_worker_process_loses_nothing(tmp_path, qa_rows, tiny_model_dir):
    # SQLite, the default, shared by two processes; the store tests cover leases on PostgreSQL too.
    db_url = f"sqlite:///{tmp_path / 'tunery.db'}"
    home = tmp_path / "home"
    store = Store(db_url, base_url="http://tunery.test", webhook_body=webhook_body)
    store.ensure_base_models([("tiny", None, str(tiny_model_dir))])
    store.create_model("alice", "dest")
    data = write_jsonl(tmp_path / "train.jsonl", qa_rows)
    # Checkpoints far apart, so the kill lands between two saves, not during one.
    job = {"train_data": str(data), "max_steps": 20, "save_steps": 5, "num_validation_samples": 4,
           "run_validation": False, "logging_steps": 1}
    training = store.create_training("alice", model="tunery/tiny", version_id=base_version_id("tiny"),
                                     destination="alice/dest", input=job,
                                     job=Job(inputs=job, base=str(tiny_model_dir)).model_dump())

    env = {**os.environ, "TUNERY_HOME": str(home), "TUNERY_LEASE_SECONDS": "3",
           "TUNERY_PUBLIC_URL": "http://tunery.test"}
    code = ("from tunery.server.cli import worker_command; "
            f"worker_command(database_url={db_url!r}, worker_id='doomed')")
    victim = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = home / "artifacts" / "trainings" / training.id
    try:
        wait_for(lambda: _complete_checkpoint(run_dir / "checkpoints"), 120, "the first checkpoint")
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    killed_at = time.monotonic()
    row = store.load_training(training.id)
    assert (row.status, row.lease_owner, row.attempts) == ("processing", "doomed", 1)

    # The training child notices its worker is gone and stops too, leaving the run directory alone.
    pattern = ["pgrep", "-f", f"tunery.worker.child {run_dir}"]
    wait_for(lambda: subprocess.run(pattern, capture_output=True).returncode == 1, 5,
             "the orphaned training process to exit")

    heir = Worker(store, Settings(home=home, lease_seconds=3), worker_id="heir", poll_interval=0.2)
    assert heir.run_once() is False  # the dead worker's lease still holds
    wait_for(heir.run_once, 15, "the expired lease to be claimed")
    assert time.monotonic() - killed_at > 1

    row = store.load_training(training.id)
    assert row.status == "succeeded", row.error
    assert row.attempts == 2 and "attempt 2, resuming from the last checkpoint" in row.logs
    events = read_events(run_dir / "events.jsonl")
    logs = [e["message"] for e in events if e["type"] == "log"]
    resumed = [m for m in logs if m.startswith("resuming from")]
    assert len(resumed) == 1 and "checkpoint-" in resumed[0]
    assert [e["type"] for e in events].count("started") == 2 and events[-1]["type"] == "succeeded"
    steps = [h["step"] for h in row.metrics["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 20  # no step twice, though some ran twice
    dest = store.get_model("alice", "alice", "dest")
    assert row.output["version"] == f"alice/dest:{store.latest_version(dest.id).id}"
    store.close()


def test_torn_checkpoints_are_dropped(tmp_path):
    folders = [tmp_path / "checkpoints" / f"checkpoint-{n}" for n in (10, 20, 30)]
    good, torn, cut = folders
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    (good / "trainer_state.json").write_text("{}")
    (cut / "trainer_state.json").write_text('{"global_step": 3')  # killed while writing it
    assert Run(tmp_path).drop_torn_checkpoints() == [torn.name, cut.name]
    assert good.is_dir() and not torn.exists() and not cut.exists()


def test_worker_command_stops_on_sigterm_and_tokens_create_prints_a_token(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'tunery.db'}"
    env = {**os.environ, "TUNERY_HOME": str(tmp_path / "home"), "TUNERY_DATABASE_URL": db_url}
    code = "from tunery.server.cli import tokens_create; tokens_create(owner='alice', label='ci')"
    made = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    token = made.stdout.strip()
    assert made.returncode == 0 and token.startswith("tny_"), made.stderr

    code = "from tunery.server.cli import worker_command; worker_command(worker_id='calm')"
    worker = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        store = Store(db_url)
        assert store.authenticate(token).owner == "alice"
        store.close()
        # Signal it once it says it started (its handlers are in place by then), however slow the machine.
        seen: list[str] = []
        watchdog = threading.Timer(60, worker.kill)  # a worker that never starts ends the wait
        watchdog.start()
        try:
            while not any("worker calm started" in line for line in seen):
                line = worker.stderr.readline()
                assert line, "".join(seen)  # it exited (or was killed) before starting
                seen.append(line)
        finally:
            watchdog.cancel()
        worker.send_signal(signal.SIGTERM)
        _, rest = worker.communicate(timeout=20)
        stderr = "".join(seen) + rest
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, stderr
    assert "worker calm stopped" in stderr
