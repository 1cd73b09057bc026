"""Hardware routing: workers' labels and SKUs, `GET /v1/hardware` (through the official replicate
client too), a training's hardware (its own, or its destination model's) checked against the
running workers at creation, and two real workers with different labels each running only the
training meant for it."""

from __future__ import annotations

import json
import threading

import pytest

from test_api_models import assert_problem
from test_api_support import LiveServer
from test_worker import queue, wait_for
from tunery.models.memory import Devices
from tunery.server.replicate.shapes import webhook_body
from tunery.settings import Settings
from tunery.store import Store, base_version_id
from tunery.store.models import Training, hardware_matches, parse_labels, worker_labels
from tunery.store.testing import fresh_database, pg_url
from tunery.worker.runner import Worker

GIB = 1024**3
CPU = Devices("cpu", 16 * GIB, "this machine's available memory (16 GiB)")
H100 = Devices("cuda", 80 * GIB, "NVIDIA H100 80GB HBM3 (79.1 GiB)", 2, "bf16")
BASE = f"/v1/models/tunery/smollm2-135m/versions/{base_version_id('smollm2-135m')}/trainings"


def test_labels_skus_and_matching():
    assert parse_labels("gpu=a100, mem=80g") == {"gpu": "a100", "mem": "80g"}
    assert parse_labels("") == {}
    for bad in ("gpu", "GPU=a100", "gpu=a 100", "=x"):
        with pytest.raises(ValueError, match="is not KEY=VALUE"):
            parse_labels(bad)
    cpu = worker_labels({}, "cpu", CPU.description)
    assert cpu == {"kind": "cpu", "hardware": "cpu"}
    assert worker_labels({}, "cuda", H100.description)["hardware"] == "gpu-h100"
    assert worker_labels({"gpu": "a100"}, "cuda", "NVIDIA A100-SXM4-80GB")["hardware"] == "gpu-a100"
    big = worker_labels({"gpu": "a100", "mem": "80g", "hardware": "gpu-a100-large"}, "cuda", "")
    assert big["hardware"] == "gpu-a100-large"
    # "cpu" (Replicate's default) and nothing ask for nothing in particular.
    assert all(hardware_matches(w, cpu) for w in (None, "", "cpu"))
    assert hardware_matches("gpu-a100-large", big) and not hardware_matches("gpu-a100-large", cpu)
    assert hardware_matches("gpu=a100,mem=80g", big) and not hardware_matches("gpu=a100,mem=40g", big)
    assert hardware_matches("kind=cuda", big) and not hardware_matches("kind=cuda", cpu)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("api-hardware"), lease_seconds=30.0)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def alice(server):
    with server.client("alice") as client:
        for name, hardware in (("dest", "cpu"), ("big-dest", "gpu-a100-large")):
            client.post("/v1/models", json={"owner": "alice", "name": name, "visibility": "private",
                                            "hardware": hardware}).raise_for_status()
        yield client


def _data(client) -> str:
    rows = "".join(json.dumps({"prompt": f"Item {i}:", "completion": f" {i % 3}"}) + "\n" for i in range(24))
    made = client.post("/v1/files", files={"content": ("train.jsonl", rows.encode(), "application/jsonl")})
    assert made.status_code == 201, made.text
    return made.json()["urls"]["get"]


def test_a_training_nobody_can_run_is_refused_with_what_exists(server, alice):
    server.store.register_worker("cpu-1", CPU, host="a")
    try:
        url = _data(alice)
        before = server.counts()
        for body in ({"destination": "alice/dest", "hardware": "gpu-h100"},
                     {"destination": "alice/big-dest"},  # the destination model's hardware
                     {"destination": "alice/dest", "hardware": "gpu=a100"}):
            refused = alice.post(BASE, json={**body, "input": {"train_data": url, "num_validation_samples": 4}})
            problem = assert_problem(refused, 422)
            assert problem["title"] == "No worker offers this hardware"
            assert "the running workers offer: cpu (1 worker: hardware=cpu,kind=cpu)" in problem["detail"]
            assert problem["errors"][0]["field"] == "hardware"
        bad = assert_problem(alice.post(BASE, json={"destination": "alice/dest", "hardware": "gpu=A 1",
                                                    "input": {"train_data": url}}), 422)
        assert "is not KEY=VALUE" in bad["detail"]
        assert server.counts() == before
        # "cpu", the default, runs anywhere; the job records no requirement.
        made = alice.post(BASE, json={"destination": "alice/dest", "input": {"train_data": url,
                                                                             "num_validation_samples": 4}})
        assert made.status_code == 201, made.text
        assert "hardware" not in server.store.load_training(made.json()["id"]).job
    finally:
        server.store.forget_worker("cpu-1")


def test_hardware_lists_what_running_workers_offer_and_routes_by_sku_or_labels(server, alice):
    import replicate

    server.store.register_worker("cpu-1", CPU, host="a")
    server.store.register_worker("h100-1", H100, host="b", labels={"pool": "research"})
    server.store.register_worker("a100-1", Devices("cuda", 80 * GIB, "NVIDIA A100-SXM4-80GB (79 GiB)"), host="c",
                                 labels={"gpu": "a100", "mem": "80g", "hardware": "gpu-a100-large"})
    try:
        listed = alice.get("/v1/hardware").json()
        assert [(e["sku"], e["workers"]) for e in listed] == [("cpu", 1), ("gpu-a100-large", 1), ("gpu-h100", 1)]
        h100 = next(e for e in listed if e["sku"] == "gpu-h100")
        assert h100["name"] == "NVIDIA H100 80GB HBM3 ×2" and h100["labels"][0]["pool"] == "research"
        client = replicate.Client(api_token=alice.headers["Authorization"].split()[1], base_url=server.url)
        assert {h.sku for h in client.hardware.list()} == {"cpu", "gpu-a100-large", "gpu-h100"}
        url = _data(alice)
        for body, recorded in (({"destination": "alice/big-dest"}, "gpu-a100-large"),
                               ({"destination": "alice/dest", "hardware": "pool=research"}, "pool=research"),
                               ({"destination": "alice/dest", "hardware": "gpu-h100"}, "gpu-h100")):
            made = alice.post(BASE, json={**body, "input": {"train_data": url, "num_validation_samples": 4}})
            assert made.status_code == 201, made.text
            job = server.store.load_training(made.json()["id"]).job
            assert job["hardware"] == recorded
            # The memory estimate counts only the workers that may run it.
            assert set(job.get("memory", {})) <= {"cuda/2/bf16", "cuda/1/fp32"}
    finally:
        for worker_id in ("cpu-1", "h100-1", "a100-1"):
            server.store.forget_worker(worker_id)


@pytest.fixture
def worker_store(tmp_path, tiny_model_dir):
    backend = "postgresql" if pg_url() else "sqlite"
    with fresh_database(backend, tmp_path) as url:
        s = Store(url, base_url="http://tunery.test", webhook_body=webhook_body)
        s.ensure_base_models([("tiny", "a tiny random Llama", str(tiny_model_dir))])
        s.create_model("alice", "dest")
        yield s
        s.close()


def test_two_workers_with_different_labels_each_run_only_the_training_meant_for_them(worker_store, tmp_path,
                                                                                     tiny_model_dir, qa_rows):
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", qa_rows)
    small, big = (queue(worker_store, data, tiny_model_dir) for _ in range(2))
    for row, hardware in ((small, "pool=small"), (big, "pool=big")):
        with worker_store.session() as s:
            s.get(Training, row.id).job = {**row.job, "hardware": hardware}
    workers = [Worker(worker_store, Settings(home=tmp_path / name, lease_seconds=3.0, worker_labels=f"pool={name}"),
                      worker_id=f"{name}-worker", poll_interval=0.1) for name in ("big", "small")]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run_forever, args=(stop,)) for w in workers]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(worker_store.load_training(t.id).status in ("succeeded", "failed") for t in (small, big)),
                 180, "both trainings to end")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    for row, name in ((small, "small"), (big, "big")):
        done = worker_store.load_training(row.id)
        assert done.status == "succeeded", done.error
        assert done.attempts == 1  # claimed once, by its worker: the other passed it over
        assert f"worker {name}-worker: attempt 1" in done.logs
