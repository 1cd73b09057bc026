"""A server that dies mid-prediction loses nothing: the restarted server runs it again."""

from __future__ import annotations

from test_api_support import LiveServer, wait_for
from tunery.store import base_version_id


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
    store.set_prediction_output(running.id, ["half"])
    queued = store.create_prediction("alice", model="tunery/tiny", version_id=version,
                                     input={"prompt": "Item:", "max_new_tokens": 4, "temperature": 0})
    doomed = store.create_prediction("alice", model="tunery/tiny", version_id=version,
                                     input={"prompt": "Item:", "max_new_tokens": 4})
    store.start_prediction(doomed.id)
    store.cancel_prediction("alice", doomed.id)
    first.stop()

    second = LiveServer(tmp_path)
    try:
        import httpx

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
