"""Deleting models and versions: their rows and predictions, their weights in storage (a
checkpoint folder, the run's final weights, the whole run once nothing lives in it) and on the
serving engine; refused while a training writes to the model, for base models, and when other
owners ran the version; through Replicate's DELETEs with the official client's routes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from test_api_models import assert_problem
from test_api_support import FAKE_BASE, LiveServer, ScriptedEngine
from test_worker import data_file, db_url, queue, settings, store  # noqa: F401 (fixtures)
from tunery.artifacts.run import checkpoint_step
from tunery.service import models
from tunery.service.errors import Conflict, Forbidden
from tunery.service.prediction_runner import PredictionRunner
from tunery.store.models import Model, Prediction, Version
from tunery.store.store import base_version_id
from tunery.worker.runner import Worker


def test_checkpoint_versions_serve_then_deleting_removes_their_weights_everywhere(
        store, settings, data_file, tiny_model_dir):  # noqa: F811
    from tunery.infer.embedded import EmbeddedEngine
    from tunery.infer.weights import resolve_weights
    from tunery.server.replicate.shapes import version_json

    # keep_checkpoints_as_versions: each checkpoint the run keeps becomes a version, older than the
    # final one, which stays the latest; each resolves to its checkpoint with the run's tokenizer.
    training = queue(store, data_file, tiny_model_dir, max_steps=3, save_steps=1, save_total_limit=2,
                     keep_checkpoints_as_versions=True)
    assert Worker(store, settings, worker_id="w", poll_interval=0.1).run_once()
    done = store.load_training(training.id)
    assert done.status == "succeeded", done.error
    dest = store.get_model("alice", "alice", "dest")
    ckpt2, ckpt3, final = store.all_versions(dest.id)
    assert [checkpoint_step(v.run_url) for v in (ckpt2, ckpt3, final)] == [2, 3, None]
    assert store.latest_version(dest.id).id == final.id and done.output["version"].endswith(final.id)
    assert done.output["checkpoint_versions"] == [f"alice/dest:{v.id}" for v in (ckpt2, ckpt3)]
    assert version_json(ckpt2)["training"] == {"id": training.id, "checkpoint_step": 2}
    assert version_json(final)["training"] == {"id": training.id, "checkpoint_step": None}
    weights = resolve_weights(ckpt2.run_url, settings)
    assert weights.kind == "adapter" and weights.path.name == "checkpoint-2"
    assert weights.tokenizer is not None and weights.tokenizer.name == "tokenizer" and weights.base_sha256
    run = settings.run(final.run_url)
    engine = EmbeddedEngine(str(tiny_model_dir), device="cpu", precision="fp32")
    runner = PredictionRunner(store, settings=settings)
    runner.use_engine(final.base_name, engine)
    try:
        from tunery.infer.generation import Request, SamplingParams

        for v in (ckpt2, final):
            gen = engine.submit(Request("hi", SamplingParams(max_new_tokens=2), resolve_weights(v.run_url, settings)))
            gen.text()
            assert gen.stop_reason in ("eos", "max_new_tokens") and gen.output_tokens >= 1
        assert {Path(k).name for k in engine.loaded_adapters} == {"checkpoint-2", "adapter"}  # each its own

        # A queued training into the model blocks deleting it, and its versions.
        blocker = queue(store, data_file, tiny_model_dir)
        with pytest.raises(Conflict, match=f"while a training writes to it or trains from it: {blocker.id}"):
            models.delete_version(store, settings, runner, "alice", dest, ckpt2)
        store.cancel_training("alice", blocker.id)

        models.delete_version(store, settings, runner, "alice", dest, ckpt2)
        assert not (run.work / "checkpoints" / "checkpoint-2").exists()
        assert (run.work / "checkpoints" / "checkpoint-3").is_dir() and (run.work / "adapter").is_dir()
        deadline = time.monotonic() + 10
        while "checkpoint-2" in {Path(k).name for k in engine.loaded_adapters} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {Path(k).name for k in engine.loaded_adapters} == {"adapter"}

        # The final weights go; the checkpoint version still living in the run keeps its folder.
        models.delete_version(store, settings, runner, "alice", dest, final)
        assert not (run.work / "adapter").exists() and not (run.work / "training_output.zip").exists()
        assert (run.work / "checkpoints" / "checkpoint-3").is_dir()
        assert [v.id for v in store.all_versions(dest.id)] == [ckpt3.id]

        # The model, with its last version: the run is gone, and so is the model.
        models.delete_model(store, settings, runner, "alice", dest)
        assert not run.work.exists()
        assert store.get_model("alice", "alice", "dest") is None
        assert store.load_training(training.id).status == "succeeded"  # the training's record stays
    finally:
        engine.close()


@pytest.fixture
def server(tmp_path):
    live = LiveServer(tmp_path)
    live.store.ensure_base_models([("fake", "scripted", FAKE_BASE)])
    live.runner.use_engine(FAKE_BASE, ScriptedEngine(["a", "b"]))
    yield live
    live.stop()


def _version(server, owner: str, name: str, visibility: str = "private") -> tuple[Model, Version]:
    model = server.store.create_model(owner, name, visibility=visibility)
    with server.store.session() as s:
        version = Version(model_id=model.id, base_name=FAKE_BASE, run_url=None)
        s.add(version)
    return model, version


def test_replicates_deletes_through_the_official_client_and_what_they_refuse(server):
    with server.client("alice") as alice, server.client("bob") as bob:
        _, v1 = _version(server, "alice", "m")
        with server.store.session() as s:
            v2 = Version(model_id=v1.model_id, base_name=FAKE_BASE, run_url=None)
            s.add(v2)
        ran = alice.post("/v1/predictions", json={"version": v1.id, "input": {"prompt": "x"}},
                         headers={"Prefer": "wait"})
        assert ran.status_code == 201
        # Not yours: another owner's private model is not found; a base model is forbidden.
        assert_problem(bob.delete(f"/v1/models/alice/m/versions/{v1.id}"), 404)
        assert_problem(alice.delete("/v1/models/tunery/fake"), 403)
        assert_problem(alice.delete(f"/v1/models/tunery/fake/versions/{base_version_id('fake')}"), 403)
        # A training writing to it: 409, nothing deleted.
        blocker = server.store.create_training("alice", model="tunery/fake", version_id=base_version_id("fake"),
                                               destination="alice/m", input={}, job={"base": FAKE_BASE})
        refused = assert_problem(alice.delete(f"/v1/models/alice/m/versions/{v1.id}"), 409)
        assert blocker.id in refused["detail"]
        server.store.cancel_training("alice", blocker.id)
        import replicate

        client = replicate.Client(api_token=alice.headers["Authorization"].split()[1], base_url=server.url)
        assert client.models.get("alice/m").versions.delete(v1.id) is True  # the official client's call
        assert_problem(alice.get(f"/v1/models/alice/m/versions/{v1.id}"), 404)
        assert alice.get(f"/v1/predictions/{ran.json()['id']}").status_code == 404  # its predictions went too
        assert alice.get("/v1/models/alice/m").json()["latest_version"]["id"] == v2.id
        # Other owners ran a public model's version: it stays.
        _, shared = _version(server, "alice", "shared", visibility="public")
        assert bob.post("/v1/predictions", json={"version": shared.id, "input": {"prompt": "x"}},
                        headers={"Prefer": "wait"}).status_code == 201
        assert "other owners ran 1 predictions" in assert_problem(alice.delete("/v1/models/alice/shared"), 409)["detail"]
        # The model, with its remaining version.
        assert client.models.delete("alice/m") is True
        assert_problem(alice.get("/v1/models/alice/m"), 404)
        assert server.count(Prediction) == 1  # bob's, on the shared model


def test_the_service_refuses_base_models_and_other_owners_models(server):
    base = server.store.get_model("alice", "tunery", "fake")
    with pytest.raises(Forbidden, match="is a base model"):
        models.delete_model(server.store, server.settings, None, "alice", base)
    model, _ = _version(server, "bob", "theirs", visibility="public")
    with pytest.raises(Forbidden, match="not yours to delete"):
        models.delete_model(server.store, server.settings, None, "alice", model)
