"""A server that dies mid-prediction loses nothing: the restarted server, or another on the same
database, runs it again; a prediction a live server holds is never run twice."""

from __future__ import annotations

import httpx

from test_api_support import LiveServer, ScriptedEngine, wait_for
from tunery.store import base_version_id
from tunery.store.models import Prediction, utcnow


def test_unfinished_predictions_run_again_after_a_restart(tmp_path, tiny_model_dir):
    first = LiveServer(tmp_path)
    first.store.ensure_base_models([("tiny", "tiny test model", str(tiny_model_dir))])
    token = first.store.create_token("alice")
    version = base_version_id("tiny")
    # One prediction that a crash left half-run, one never started, one whose cancel was asked for.
    store = first.store
    running = store.create_prediction("alice", model="tunery/tiny", version_id=version,
                                      input={"prompt": "Item:", "max_new_tokens": 4, "temperature": 0})
    store.start_prediction(running.id)
    store.set_predictions_output({running.id: ["half"]})
    queued = store.create_prediction("alice", model="tunery/tiny", version_id=version,
                                     input={"prompt": "Item:", "max_new_tokens": 4, "temperature": 0})
    doomed = store.create_prediction("alice", model="tunery/tiny", version_id=version,
                                     input={"prompt": "Item:", "max_new_tokens": 4})
    store.start_prediction(doomed.id)
    store.cancel_prediction("alice", doomed.id)
    first.stop()

    second = LiveServer(tmp_path)
    try:
        with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            results = {}
            for p in (running, queued, doomed):
                results[p.id] = wait_for(lambda p=p: c.get(f"/v1/predictions/{p.id}").json(),
                                         lambda body: body["status"] in ("succeeded", "failed", "canceled"),
                                         timeout=120)
        assert results[running.id]["status"] == "succeeded" and results[queued.id]["status"] == "succeeded"
        assert "half" not in "".join(results[running.id]["output"])
        assert results[running.id]["output"] == results[queued.id]["output"]  # greedy, same prompt
        assert results[doomed.id]["status"] == "canceled"
    finally:
        second.stop()


def test_servers_sharing_a_database_run_each_prediction_once(tmp_path):
    """Server A runs one prediction and has a second queued behind it (waiting several lease
    periods) when server B starts on the same database: B takes neither. A prediction held by a
    server that died is taken over by a live one once its lease runs out, and not before."""
    home = tmp_path / "home"
    home.mkdir()
    a = LiveServer(home, lease_seconds=2.0)
    a.store.ensure_base_models([("slow", "scripted, slow", "slow-base")])
    script = [f"w{i} " for i in range(30)]
    a_engine = ScriptedEngine(script, delay=0.1)
    a.runner.use_engine("slow-base", a_engine)
    token = a.store.create_token("alice")
    version = base_version_id("slow")
    b = None
    try:
        with httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as ca:
            ids = [ca.post("/v1/predictions", json={"version": version, "input": {"prompt": p}}).json()["id"]
                   for p in ("first", "second")]
            wait_for(lambda: ca.get(f"/v1/predictions/{ids[0]}").json(), lambda p: p["status"] == "processing")

            b = LiveServer(home, lease_seconds=2.0)
            b_engine = ScriptedEngine(script, delay=0.01)
            b.runner.use_engine("slow-base", b_engine)
            # A prediction held by a server that died a moment ago: its lease runs 3 s more.
            lost = b.store.create_prediction("alice", model="tunery/slow", version_id=version,
                                             input={"prompt": "lost"}, runner="dead-server", lease_seconds=3.0)
            b.store.start_prediction(lost.id, "dead-server")
            b.store.set_predictions_output({lost.id: ["half"]}, "dead-server")
            assert b.runner.keep_leases() == 0 and a.runner.keep_leases() == 0  # not before its lease ends

            for pid in ids:  # ~6 s in all: many lease periods of A, renewed all along
                body = wait_for(lambda pid=pid: ca.get(f"/v1/predictions/{pid}").json(),
                                lambda p: p["status"] == "succeeded", timeout=30)
                assert "".join(body["output"]) == "".join(script)
            assert [c["prompt"] for c in a_engine.calls][:2] == ["first", "second"]
            assert not {"first", "second"} & {c["prompt"] for c in b_engine.calls}  # B never ran A's

            taken = wait_for(lambda: ca.get(f"/v1/predictions/{lost.id}").json(),
                             lambda p: p["status"] == "succeeded", timeout=30)
            assert taken["output"] and "half" not in "".join(taken["output"])
            runs = [c for c in a_engine.calls + b_engine.calls if c["prompt"] == "lost"]
            assert len(runs) == 1  # taken over by one live server, run once
    finally:
        if b is not None:
            b.stop()
        a.stop()


def test_a_clean_shutdown_hands_predictions_back(tmp_path, tiny_model_dir):
    """Stopping a server stops what it runs without ending it: the next server runs it at once
    (here with the real tiny model, where the first ran a slow script)."""
    home = tmp_path / "home"
    home.mkdir()
    a = LiveServer(home)
    a.store.ensure_base_models([("tiny", "tiny test model", str(tiny_model_dir))])
    a.runner.use_engine(str(tiny_model_dir), ScriptedEngine([f"w{i} " for i in range(100)], delay=0.1))
    token = a.store.create_token("alice")
    version = base_version_id("tiny")
    inputs = {"max_new_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as ca:
        ids = [ca.post("/v1/predictions", json={"version": version, "input": {"prompt": p, **inputs}}).json()["id"]
               for p in ("Item:", "Animal:")]
        wait_for(lambda: ca.get(f"/v1/predictions/{ids[0]}").json(), lambda p: p["output"])
    a.stop()
    with a.store.session() as s:
        rows = [s.get(Prediction, pid) for pid in ids]
        assert [r.status for r in rows] == ["processing", "processing"]  # both were generating at once
        assert all(r.lease_expires_at <= utcnow() for r in rows)

    b = LiveServer(home)  # the default 30 s lease: taken over at start, not after it
    try:
        with httpx.Client(base_url=b.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as cb:
            for pid in ids:
                body = wait_for(lambda pid=pid: cb.get(f"/v1/predictions/{pid}").json(),
                                lambda p: p["status"] in ("succeeded", "failed", "canceled"), timeout=20)
                assert body["status"] == "succeeded" and body["output"], body
                assert not "".join(body["output"]).startswith("w0 ")  # run afresh, not A's partial output
    finally:
        b.stop()
