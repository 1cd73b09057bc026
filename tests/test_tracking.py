"""report_to: TensorBoard, W&B (offline) and MLflow (a local folder) get the training's losses,
read back with each library's own reader; bad or missing trackers fail as input errors."""

from __future__ import annotations

import importlib.util
import struct

import pytest

from conftest import write_jsonl
from tunery.artifacts.run import Run
from tunery.errors import SpecError
from tunery.spec import parse_inputs
from tunery.train.recipe import train

STEPS = 3


@pytest.fixture
def data_file(tmp_path, qa_rows):
    return write_jsonl(tmp_path / "train.jsonl", qa_rows)


def run_with(tracker, tmp_path, data_file, tiny_model_dir):
    spec = {"train_data": str(data_file), "run_validation": False, "save_steps": 1000, "logging_steps": 1,
            "max_steps": STEPS, "report_to": tracker}
    result = train(spec, base=str(tiny_model_dir), output_dir=tmp_path / f"run-{tracker}", progress=False)
    losses = [h["loss"] for h in result.manifest["metrics"]["history"] if "loss" in h]
    assert len(losses) == STEPS
    return result, Run(result.run_dir), losses


def test_tensorboard(tmp_path, data_file, tiny_model_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, run, losses = run_with("tensorboard", tmp_path, data_file, tiny_model_dir)
    scalars, texts = {}, set()
    for events in sorted(run.tensorboard.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            scalars.update({e.step: e.value for e in acc.Scalars("train/loss")})
        texts |= set(acc.Tags()["tensors"])
    assert sorted(scalars) == [1, 2, 3]
    assert [scalars[s] for s in sorted(scalars)] == pytest.approx(losses, rel=1e-6)
    assert "tunery/inputs/text_summary" in texts and "args/text_summary" in texts


def wandb_records(path):
    """The protobuf records of an offline W&B run file (`run-ID.wandb`): a 7-byte header, then
    LevelDB-log blocks of 32 KiB whose records (7-byte header: crc, length, type) hold pieces of
    wandb.proto Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_offline(tmp_path, data_file, tiny_model_dir, monkeypatch):
    pytest.importorskip("wandb")
    import json

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    result, run, losses = run_with("wandb", tmp_path, data_file, tiny_model_dir)
    [folder] = run.wandb.glob("offline-run-*")
    [file] = folder.glob("run-*.wandb")
    logged, config, name, project = {}, {}, None, None
    for record in wandb_records(file):
        if record.HasField("run"):  # with the config given to wandb.init
            name, project = record.run.display_name, record.run.project
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        if record.HasField("config"):  # updates (the Trainer's arguments)
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        if record.HasField("history"):
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                logged[items["train/global_step"]] = items["train/loss"]
    assert name == run.name and project == "tunery"
    assert [logged[s] for s in sorted(logged)] == pytest.approx(losses, rel=1e-6)
    assert config["tunery"]["report_to"] == "wandb" and config["tunery"]["max_steps"] == STEPS
    assert "learning_rate" in config  # the Trainer's arguments


def test_mlflow_local_folder(tmp_path, data_file, tiny_model_dir, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    result, run, losses = run_with("mlflow", tmp_path, data_file, tiny_model_dir)
    client = MlflowClient(f"file:{run.mlruns}")
    [found] = client.search_runs([client.get_experiment_by_name("tunery").experiment_id])
    assert found.info.run_name == run.name and found.info.status == "FINISHED"
    history = sorted(client.get_metric_history(found.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(losses, rel=1e-6)
    assert found.data.params["tunery.max_steps"] == str(STEPS) and "learning_rate" in found.data.params


def test_unknown_tracker_is_an_input_error():
    with pytest.raises(SpecError) as info:
        parse_inputs({"train_data": "x.jsonl", "report_to": "tensorboard,comet"})
    assert str(info.value) == ("invalid training input: report_to: unknown tracker 'comet' "
                               "(allowed: none, tensorboard, wandb, mlflow)")
    assert parse_inputs({"train_data": "x.jsonl", "report_to": " WandB , mlflow"}).trackers == ["wandb", "mlflow"]
    assert parse_inputs({"train_data": "x.jsonl"}).trackers == []


def test_missing_tracker_package_fails_before_any_model_loads(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SpecError) as info:  # the base does not exist: nothing got that far
        train({"train_data": "x.jsonl", "report_to": "wandb"}, base=str(tmp_path / "none"), progress=False)
    assert str(info.value) == ("invalid training input: report_to=wandb needs the wandb package: "
                               "pip install wandb")
    assert "\n" not in str(info.value)
