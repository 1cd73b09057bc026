"""Service trainings on several processes: a worker's devices, one process per device under
`accelerate launch` (DDP, or FSDP full sharding with the fsdp input). Here two CPU processes over
gloo, through the API; the same command runs one process per GPU on a GPU machine. accelerate
shards with FSDP over GPUs only: on CPU processes the fsdp input says so and trains with DDP."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from test_api_support import LiveServer
from test_worker import wait_for
from tunery.artifacts import TrainingJob as Job
from tunery.errors import TuneryError
from tunery.settings import Settings
from tunery.store import base_version_id
from tunery.worker.runner import processes_for
from tunery.worker.service import split_devices


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    live = LiveServer(tmp_path_factory.mktemp("api-processes"), start_workers=True, train_processes=2)
    live.store.ensure_base_models([("tiny", "a tiny random Llama", str(tiny_model_dir))])
    live.store.create_model("alice", "dest")
    yield live
    live.stop()


def _train(server, alice, data_url: str, **inputs) -> dict:
    body = {"destination": "alice/dest", "input": {
        "train_data": data_url, "max_steps": 4, "num_validation_samples": 4, "train_batch_size": 4,
        "micro_batch_size": 2, "logging_steps": 1, "lora_dropout": 0, **inputs}}
    made = alice.post(f"/v1/models/tunery/tiny/versions/{base_version_id('tiny')}/trainings", json=body)
    assert made.status_code == 201, made.text
    tid = made.json()["id"]
    return wait_for(lambda: (t := alice.get(f"/v1/trainings/{tid}").json())["status"]
                    in ("succeeded", "failed", "canceled") and t, 300, "the training")


def test_a_service_training_runs_on_two_processes(server, tmp_path, qa_rows, tiny_model_dir):
    with server.client("alice") as alice:
        with open(write_jsonl(tmp_path / "d.jsonl", qa_rows), "rb") as f:
            data_url = alice.post("/v1/files", files={"content": ("d.jsonl", f)}).json()["urls"]["get"]
        ddp = _train(server, alice, data_url)
        fsdp = _train(server, alice, data_url, fsdp=True)
    for training in (ddp, fsdp):
        assert training["status"] == "succeeded", training["error"]
        assert "2 processes on the CPU" in training["logs"] and "2 processes (DDP, a whole model in each)" in training["logs"]
        assert training["metrics"]["processes"] == 2 and training["metrics"]["sharding"] == "ddp"
    assert "fsdp: accelerate shards over GPUs only; these 2 cpu processes train with DDP" in fsdp["logs"]
    # 24 rows, 4 for validation: 20 at a global batch of 4 (2 processes × micro batch 2) is 5 steps an
    # epoch; 4 steps asked. The trained adapter loads onto the base and changes its output.
    history = [h["step"] for h in ddp["metrics"]["history"] if "loss" in h]
    assert history == [1, 2, 3, 4]
    adapter = load_file(str(server.settings.training_run(ddp["id"]).weights_dir(False) / "adapter_model.safetensors"))
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    assert any(name.endswith("lora_B.weight") and t.abs().sum() > 0 for name, t in adapter.items())


def test_processes_split_the_global_batch_evenly_or_fewer_are_used():
    def job(**inputs):
        return Job(inputs={"train_data": "x.jsonl", **inputs}, base="tiny")

    four = Settings(gpus="0,1,2,3")
    assert processes_for(job(train_batch_size=8, micro_batch_size=2), four) == (4, "4 processes on GPUs 0,1,2,3")
    count, note = processes_for(job(train_batch_size=6, micro_batch_size=2), four)
    assert count == 3 and "(not 4: train_batch_size 6 / micro_batch_size 2 = 3 micro batches a step)" in note
    assert processes_for(job(train_batch_size=4, micro_batch_size=4), Settings(train_processes=2))[0] == 1
    assert processes_for(job(), Settings()) == (1, "")


def test_embedded_workers_get_devices_of_their_own():
    settings = Settings(gpus="0,1,2,3")
    assert [s.gpus for s in split_devices(settings, 2)] == ["0,1", "2,3"]
    assert [s.gpus for s in split_devices(settings, 3)] == ["0", "1", "2"]
    assert split_devices(Settings(), 2) == [Settings(), Settings()]
    with pytest.raises(TuneryError, match="5 embedded workers need at least one GPU each, but gpus names 4"):
        split_devices(settings, 5)
