"""Will it fit the workers? Running workers register their devices; training creation refuses a
training no running worker's devices can hold, with the reason and what to change; a worker
leaves a training to another whose devices hold it. On SQLite and PostgreSQL, over real HTTP,
with a real `tunery worker` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta

import pytest

from conftest import write_jsonl
from test_api_models import assert_problem
from test_api_support import LiveServer
from test_worker import wait_for
from tunery.models.memory import GIB, Devices
from tunery.settings import Settings
from tunery.store.models import Training, WorkerPresence, utcnow
from tunery.store.store import Store
from tunery.worker.runner import Worker

H100 = Devices("cuda", 80 * GIB, "NVIDIA H100 (79.6 GiB)", 1, "bf16")
L4 = Devices("cuda", 24 * GIB, "NVIDIA L4 (22 GiB)", 1, "bf16")


def test_workers_register_renew_and_lapse(db_url):
    store = Store(db_url)
    try:
        store.register_worker("small", L4, host="b")
        store.register_worker("big", H100, host="a")
        assert [w.id for w in store.live_workers(30)] == ["big", "small"]  # the most memory first
        assert store.live_workers(30)[0].devices() == H100
        store.register_worker("small", Devices("cuda", 40 * GIB, "A100", 2, "bf16"), host="b")  # renewed
        small = next(w for w in store.live_workers(30) if w.id == "small")
        assert (small.memory, small.processes, small.description) == (40 * GIB, 2, "A100")
        store.forget_worker("small")
        assert [w.id for w in store.live_workers(30)] == ["big"]
        with store.session() as s:  # its worker died a minute ago without a word
            s.get(WorkerPresence, "big").seen_at = utcnow() - timedelta(seconds=60)
        assert store.live_workers(30) == []
        with store.session() as s:  # a day later it goes, when another worker renews its own
            s.get(WorkerPresence, "big").seen_at = utcnow() - timedelta(days=2)
        store.register_worker("small", L4, host="b")
        with store.session() as s:
            assert s.get(WorkerPresence, "big") is None
    finally:
        store.close()


def test_a_worker_leaves_a_training_to_one_whose_devices_hold_it(db_url, tmp_path):
    store = Store(db_url)
    settings = Settings(home=tmp_path, database_url=db_url)

    def queue(need_gib: float) -> Training:
        return store.create_training("alice", model="tunery/x", version_id="v", destination="alice/d",
                                     input={}, job={"memory": {H100.key(): int(need_gib * GIB)}})

    def worker(name: str, devices: Devices) -> Worker:
        w = Worker(store, settings, worker_id=name)
        w.devices = devices
        store.register_worker(name, devices, host=name)
        return w

    try:
        large, small = queue(40), queue(10)
        big, little = worker("big", H100), worker("little", L4)
        # The oldest training needs 40 GiB: the L4 leaves it to the H100 and takes the next one.
        assert store.claim_training("little", 30, skip=little._skip()).id == small.id
        assert store.claim_training("big", 30, skip=big._skip()).id == large.id
        # With no running worker that holds it, a training is claimed anyway (and refused by its own
        # check with the reason) rather than left queued forever.
        store.forget_worker("big")
        huge = queue(100)
        assert store.claim_training("little", 30, skip=little._skip()).id == huge.id
    finally:
        store.close()


def big_rows(tmp_path):
    """32 rows of ~8000 tokens: a micro batch of them has logits no machine here holds."""
    return write_jsonl(tmp_path / "long.jsonl", [{"text": "the red cat sat on the mat " * 1200} for _ in range(32)])


BIG = {"micro_batch_size": 32, "train_batch_size": 32, "max_seq_length": 8192, "chunk_size": 8192,
       "loss_computation": "full", "run_validation": False}


def test_creation_refuses_a_training_no_running_worker_can_hold(db_url, tmp_path, tiny_model_dir, qa_rows):
    server = LiveServer(tmp_path / "server", database_url=db_url, allow_local_paths=True)
    worker = None
    try:
        version = server.store.add_base("tiny", str(tiny_model_dir), description=None, registered_by="test")
        path = f"/v1/models/tunery/tiny/versions/{version.id}/trainings"
        alice = server.client("alice")
        alice.post("/v1/models", json={"owner": "alice", "name": "dest"}).raise_for_status()

        def create(data, **inputs):
            return alice.post(path, json={"destination": "alice/dest", "input": {"train_data": str(data), **inputs}})

        big, small = big_rows(tmp_path), write_jsonl(tmp_path / "qa.jsonl", qa_rows)
        # No worker runs: nothing to compare against, so the training is queued (a worker that
        # starts later checks it before it loads the model).
        queued = create(big, **BIG)
        assert queued.status_code == 201, queued.text
        assert alice.post(f"/v1/trainings/{queued.json()['id']}/cancel").status_code == 200
        assert "memory" not in server.store.load_training(queued.json()["id"]).job

        env = {**os.environ, "TUNERY_HOME": str(tmp_path / "worker"), "TUNERY_DATABASE_URL": db_url}
        code = "from tunery.server.cli import worker_command; worker_command(worker_id='fitcheck')"
        worker = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
        registered = wait_for(lambda: server.store.live_workers(30), 120, "the worker to register its devices")
        assert [w.id for w in registered] == ["fitcheck"] and registered[0].kind == "cpu"
        assert "available memory" in registered[0].description and registered[0].memory > GIB

        before = server.counts()
        problem = assert_problem(create(big, **BIG), 422)
        detail = problem["detail"]
        assert detail.startswith("this training would need ~") and "per device, more than the available memory" in detail
        assert "on worker fitcheck" in detail and "micro_batch_size 16" in detail, detail
        assert "gradient_checkpointing true" in detail and "\n" not in detail
        assert server.counts() == before  # nothing half-created

        made = create(small, max_steps=1, chunk_size=128, run_validation=False)
        assert made.status_code == 201, made.text
        alice.post(f"/v1/trainings/{made.json()['id']}/cancel")
        needs = server.store.load_training(made.json()["id"]).job["memory"]
        (key, need), = needs.items()
        assert key == registered[0].devices().key() and 0 < need < registered[0].memory

        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr
        assert server.store.live_workers(30) == []  # a stopped worker unregisters
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        server.stop()


@pytest.mark.parametrize("packed", [False, True])
def test_the_creation_estimate_is_the_trainers_own(tmp_path, tiny_model_dir, packed):
    """The estimate from a sample of the rows is the one the trainer makes from all of them: the
    same unpacked (the longest rows are in the sample), and over it by at most a third packed
    (a packed sequence is taken to be labelled as densely as the sample's most labelled row)."""
    from types import SimpleNamespace

    from tunery.data import pack, tokenize_rows, unpacked
    from tunery.models.load import load_tokenizer
    from tunery.models.memory import check_training
    from tunery.models.resolve import resolve_base
    from tunery.service.trainings import _longest_sequences
    from tunery.spec import TrainingInputs

    rows = [{"prompt": "word " * (5 + i % 40), "completion": " yes" * (1 + i % 7)} for i in range(300)]
    inputs = TrainingInputs.model_validate({"train_data": "x.jsonl", "micro_batch_size": 4, "chunk_size": 256,
                                            "pack_sequences": packed})
    folder = resolve_base(str(tiny_model_dir)).path
    tokenizer = load_tokenizer(resolve_base(str(tiny_model_dir)))
    examples = tokenize_rows(rows, "prompt_completion", tokenizer, max_length=inputs.max_length)
    trainer = pack(examples, 256, seed=inputs.seed) if packed else unpacked(examples)
    sample = _longest_sequences(inputs, folder, SimpleNamespace(rows=rows, format="prompt_completion"))
    cpu = Devices("cpu", 8 * GIB, "a CPU", 1, "fp32")
    full, _ = check_training(inputs, folder, trainer, cpu)
    estimated, _ = check_training(inputs, folder, sample, cpu)
    if packed:
        assert full.total <= estimated.total < 1.35 * full.total, (estimated, full)
    else:
        assert estimated.total == full.total
