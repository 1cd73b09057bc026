"""Per-owner limits and fair share: the store's limits (SQLite and PostgreSQL), workers passing
over an owner at their running-trainings limit (also when two claim at once), the queued-trainings,
predictions and requests-per-minute refusals in each API's 429 shape, the CLI and the operators'
routes, and fair admission: one owner's flood delays another owner's prediction by one batch slot
at most, on the engine and through the HTTP API with a real model."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from test_api_models import assert_problem
from test_api_support import LiveServer, ScriptedEngine, wait_for
from test_store_jobs import _race
from tunery.server.replicate.shapes import webhook_body
from tunery.store import Store, base_version_id
from tunery.store.models import DEFAULT_OWNER, LIMITS, Prediction, Training

SLOW = base_version_id("slow")
TINY = base_version_id("tiny")


# -- the store -----------------------------------------------------------------------------------

@pytest.fixture
def store(db_url):
    s = Store(db_url, base_url="http://tunery.test", webhook_body=webhook_body)
    s.ensure_base_models([("smollm2-135m", None, "smollm2-135m")])
    for owner in ("alice", "bob"):
        s.create_model(owner, "dest")
    yield s
    s.close()


def _training(store: Store, owner: str) -> Training:
    return store.create_training(owner, model="tunery/smollm2-135m", version_id=base_version_id("smollm2-135m"),
                                 destination=f"{owner}/dest", input={"train_data": "x"}, job={"base": "smollm2-135m"})


def test_limits_fall_through_owner_then_everyone_then_built_in(store):
    assert store.limits("alice").trainings == LIMITS["trainings"]
    assert store.limits("alice").source["trainings"] == "built in"
    store.set_limits(DEFAULT_OWNER, {"trainings": 2, "requests_per_minute": 100})
    store.set_limits("alice", {"trainings": 0})
    alice, bob = store.limits("alice"), store.limits("bob")
    assert (alice.trainings, alice.source["trainings"]) == (0, "owner")  # 0: no limit, and it wins
    assert (alice.requests_per_minute, alice.source["requests_per_minute"]) == (100, "everyone")
    assert (bob.trainings, bob.source["trainings"]) == (2, "everyone")
    assert bob.predictions is None and bob.source["predictions"] == "built in"
    # Unsetting every field removes the owner's row: everyone's apply again.
    store.set_limits("alice", {"trainings": None})
    assert [row.owner for row in store.limit_rows()] == [DEFAULT_OWNER]
    assert store.limits("alice").trainings == 2
    with pytest.raises(ValueError, match="trainings: must be a whole number"):
        store.set_limits("alice", {"trainings": -1})
    with pytest.raises(ValueError, match="gpus: not a limit"):
        store.set_limits("alice", {"gpus": 1})


def test_a_worker_passes_over_an_owner_at_their_running_limit(store):
    store.set_limits("alice", {"trainings": 1})
    a1, a2 = _training(store, "alice"), _training(store, "alice")
    b1 = _training(store, "bob")
    assert store.training_counts("alice") == {"running": 0, "queued": 2}
    assert store.claim_training("w1", 60).id == a1.id
    # alice's second is older than bob's, but alice is at her limit: bob's goes first.
    assert store.claim_training("w2", 60).id == b1.id
    assert store.claim_training("w3", 60) is None
    assert store.training_counts("alice") == {"running": 1, "queued": 1}
    # The one held back says why, once, however often workers pass it over.
    assert store.claim_training("w4", 60) is None
    waiting = ("waiting: alice has 1 training running, the most at once for this owner (limit trainings=1); "
               "this one starts when one of them ends\n")
    assert store.get_training("alice", a2.id).logs == waiting
    assert not store.get_training("bob", b1.id).logs
    store.finish_training(a1.id, "w1", status="failed", error="x")
    assert store.claim_training("w3", 60).id == a2.id
    store.append_training_logs(a2.id, "w3", "step 1\n")
    assert store.get_training("alice", a2.id).logs == waiting + "step 1\n"


def test_two_workers_claiming_at_once_keep_the_running_limit(store, db_url):
    store.set_limits("alice", {"trainings": 1})
    for _ in range(3):
        _training(store, "alice")
    claimed = _race(db_url, 3, lambda s, i: s.claim_training(f"w{i}", 60))
    assert sum(row is not None for row in claimed) == 1, claimed


# -- the API -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    live = LiveServer(tmp_path_factory.mktemp("api-limits"), admin_owners="root", max_batch=2, max_queue=16)
    live.store.ensure_base_models([("slow", "scripted, slow", "slow-base"), ("tiny", "tiny test model",
                                                                             str(tiny_model_dir))])
    live.runner.use_engine("slow-base", ScriptedEngine([f"w{i} " for i in range(30)], delay=0.05))
    yield live
    live.stop()


def _limit(server, owner: str, **changes) -> None:
    server.store.set_limits(owner, changes)
    server.runner.limits.forget()


def test_requests_per_minute_are_refused_with_429_in_each_apis_shape(server):
    _limit(server, "carol", requests_per_minute=4)
    with server.client("carol") as carol, server.client("dave") as dave:
        for _ in range(4):
            assert carol.get("/v1/account").status_code == 200
        refused = carol.get("/v1/predictions")
        assert_problem(refused, 429)
        assert refused.json()["title"] == "Request was throttled"
        assert "requests per minute on one server: 4" in refused.json()["detail"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        openai = carol.get("/openai/v1/models")
        assert openai.status_code == 429 and int(openai.headers["Retry-After"]) >= 1
        assert openai.json()["error"]["code"] == "rate_limit_exceeded"
        assert openai.json()["error"]["type"] == "requests"
        assert dave.get("/v1/account").status_code == 200  # another owner is not affected
        # An operator lifts it; the server sees the change (it reads limits again).
        _limit(server, "carol", requests_per_minute=0)
        assert carol.get("/v1/account").status_code == 200


def test_an_owner_beyond_their_predictions_is_refused_and_another_owner_is_not(server):
    _limit(server, "erin", predictions=2)
    with server.client("erin") as erin, server.client("frank") as frank:
        made = [erin.post("/v1/predictions", json={"version": SLOW, "input": {"prompt": f"p{i}"}}) for i in range(2)]
        assert all(r.status_code == 201 for r in made)
        before = server.count(Prediction)
        refused = erin.post("/v1/predictions", json={"version": SLOW, "input": {"prompt": "p3"}})
        assert_problem(refused, 429)
        assert "'erin' already has 2 predictions" in refused.json()["detail"]
        assert refused.headers["Retry-After"] == "1" and server.count(Prediction) == before
        # OpenAI's completions and Azure's scoring count against the same limit, in their shapes.
        chat = erin.post("/openai/v1/completions", json={"model": "tunery/slow", "prompt": "x", "max_tokens": 2})
        assert chat.status_code == 429 and chat.json()["error"]["code"] == "rate_limit_exceeded"
        scored = erin.post("/v1/models/tunery/slow/score", json={"input_data": {"input_string": ["x"]}})
        assert scored.status_code == 429 and "predictions at once" in scored.json()["detail"]
        assert frank.post("/v1/predictions", json={"version": SLOW, "input": {"prompt": "f"}}).status_code == 201
        for r in made:
            wait_for(lambda r=r: erin.get(f"/v1/predictions/{r.json()['id']}").json(),
                     lambda p: p["status"] == "succeeded")
        assert server.runner.held("erin") == 0
        assert erin.post("/v1/predictions", json={"version": SLOW, "input": {"prompt": "again"}}).status_code == 201


def test_queued_trainings_beyond_the_limit_are_refused_before_anything_is_made(server, tmp_path):
    _limit(server, "gina", queued_trainings=1)
    with server.client("gina") as gina:
        server.store.create_model("gina", "dest")
        _training(server.store, "gina")  # queued (this server runs no workers)
        before = server.counts()
        refused = gina.post("/v1/models/tunery/tiny/versions/" + TINY + "/trainings",
                            json={"destination": "gina/dest", "input": {"train_data": "https://example.com/x.jsonl"}})
        assert_problem(refused, 429)
        body = refused.json()
        assert "'gina' already has 1 training waiting for a worker" in body["detail"]
        assert "--queued-trainings" in body["detail"]
        assert refused.headers["Retry-After"] == "60" and server.counts() == before
        rows = "".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                {"role": "assistant", "content": "ok"}]}) + "\n" for i in range(12))
        uploaded = gina.post("/openai/v1/files", data={"purpose": "fine-tune"},
                             files={"file": ("train.jsonl", rows.encode(), "application/jsonl")})
        assert uploaded.status_code == 200, uploaded.text
        job = gina.post("/openai/v1/fine_tuning/jobs", json={"model": "tunery/tiny",
                                                             "training_file": uploaded.json()["id"]})
        assert job.status_code == 429 and job.json()["error"]["code"] == "rate_limit_exceeded", job.text
        assert int(job.headers["Retry-After"]) == 60


def test_operators_set_limits_through_the_api_and_owners_read_their_own(server):
    with server.client("root") as root, server.client("hank") as hank:
        assert hank.get("/v1/limits").status_code == 403
        assert hank.patch("/v1/limits/hank", json={"trainings": 9}).status_code == 403
        changed = root.patch("/v1/limits/hank", json={"trainings": 3, "predictions": "5"})
        assert changed.status_code == 200, changed.text
        assert changed.json()["limits"]["trainings"] == 3 and changed.json()["source"]["predictions"] == "owner"
        everyone = root.patch("/v1/limits/*", json={"queued_trainings": 7})
        assert everyone.json()["owner"] == "*" and everyone.json()["limits"]["queued_trainings"] == 7
        bad = root.patch("/v1/limits/hank", json={"trainings": -2})
        assert_problem(bad, 422)
        assert "whole number" in bad.json()["detail"]
        assert root.patch("/v1/limits/hank", json={"gpus": 1}).status_code == 422
        listed = {r["owner"]: r for r in root.get("/v1/limits").json()["results"]}
        assert listed["*"]["limits"]["queued_trainings"] == 7 and listed["hank"]["limits"]["trainings"] == 3
        own = hank.get("/v1/account/limits").json()
        assert own["limits"]["predictions"] == 5 and own["limits"]["queued_trainings"] == 7
        assert own["source"]["queued_trainings"] == "everyone" and own["in_use"]["predictions"] == 0
        root.patch("/v1/limits/hank", json={"trainings": "default", "predictions": "default"})
        assert hank.get("/v1/account/limits").json()["source"]["trainings"] == "built in"
        root.patch("/v1/limits/*", json={"queued_trainings": "default"})


def test_the_cli_sets_and_shows_limits(tmp_path, monkeypatch):
    from tunery.cli import app

    monkeypatch.setenv("TUNERY_HOME", str(tmp_path))
    monkeypatch.delenv("TUNERY_DATABASE_URL", raising=False)
    from tunery.settings import get_settings

    get_settings.cache_clear()
    try:
        runner = CliRunner()
        out = runner.invoke(app, ["owners", "set-limits", "alice", "--trainings", "2", "--requests-per-minute", "0"])
        assert out.exit_code == 0, out.output
        assert "alice: trainings running at once 2 (owner)" in out.output
        assert "requests per minute on one server no limit (owner)" in out.output
        out = runner.invoke(app, ["owners", "set-limits", "*", "--predictions", "6"])
        assert "everyone:" in out.output and "predictions at once on one server 6 (everyone)" in out.output
        out = runner.invoke(app, ["owners", "limits"])
        lines = out.output.strip().splitlines()
        assert lines[0].startswith("everyone:") and lines[1].startswith("alice:") and "6 (everyone)" in lines[1]
        bad = runner.invoke(app, ["owners", "set-limits", "alice", "--trainings", "two"])
        assert bad.exit_code != 0 and "trainings: 'two' is not a whole number" in bad.output
    finally:
        get_settings.cache_clear()


# -- fair share ----------------------------------------------------------------------------------

def test_the_engine_starts_another_owners_request_in_the_first_free_slot(tiny_model_dir):
    """alice fills a batch of 2 and queues 6 more; bob's one request, sent after, starts in the
    first slot that frees: no queued request of alice's starts before it (first come, first
    served would start all 6 first), and it waits at most one of alice's generations."""
    from tunery.infer.embedded import EmbeddedEngine
    from tunery.infer.generation import Request, SamplingParams

    engine = EmbeddedEngine(str(tiny_model_dir), device="cpu", precision="fp32", max_batch=2, max_queue=16)
    try:
        engine.submit(Request("warm up", SamplingParams(max_new_tokens=2))).text()

        def req(owner: str, i: int) -> Request:
            return Request(f"request {i} of {owner}", SamplingParams(max_new_tokens=48, min_new_tokens=48,
                                                                      temperature=0), owner=owner)

        alice = [engine.submit(req("alice", i)) for i in range(8)]
        wait_for(lambda: alice[0].started_at, lambda started: started is not None)
        bob = engine.submit(req("bob", 0))
        for gen in [*alice, bob]:
            assert gen.wait(60)
        assert bob.started_at is not None
        overtook = [g for g in alice[2:] if g.started_at < bob.started_at]  # type: ignore[operator]
        assert overtook == [], [round(g.started_at - bob.submitted_at, 3) for g in overtook]  # type: ignore[operator]
        one_generation = max(g.finished_at - g.started_at for g in alice)  # type: ignore[operator]
        assert bob.started_at - bob.submitted_at <= one_generation + 0.5
    finally:
        engine.close()


def test_the_vllm_engines_slots_go_to_the_owner_with_the_fewest_in_flight():
    from tunery.infer.vllm import FairSlots

    slots = FairSlots(1)
    slots.acquire("alice")
    order: list[str] = []

    def take(owner: str) -> None:
        slots.acquire(owner)
        order.append(owner)
        time.sleep(0.01)
        slots.release(owner)

    threads = []
    for owner in ["alice", "alice", "alice", "bob"]:  # bob asks last
        threads.append(threading.Thread(target=take, args=(owner,)))
        threads[-1].start()
        time.sleep(0.05)  # each is waiting before the next asks
    slots.release("alice")
    for t in threads:
        t.join(10)
    assert order == ["bob", "alice", "alice", "alice"], order


def test_one_owners_flood_delays_another_owners_prediction_one_slot_at_most_over_http(server):
    """Two owners on loopback against a real model (batch of 2): alice sends 10 predictions at
    once, then bob one. Bob's finishes before all but the ones running when it came and one more
    (count), and within two of alice's generations (time); first come, first served would put
    it behind all ten."""
    with server.client("ivan") as alice, server.client("judy") as bob:
        body = {"version": TINY, "input": {"prompt": "Count:", "max_new_tokens": 64, "min_new_tokens": 64,
                                            "temperature": 0}}
        assert alice.post("/v1/predictions", json=body, headers={"Prefer": "wait"}).status_code == 201  # loaded
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            flood = list(pool.map(lambda _: alice.post("/v1/predictions", json=body), range(10)))
        assert all(r.status_code == 201 for r in flood)
        ids = [r.json()["id"] for r in flood]
        wait_for(lambda: server.runner.engine(_tiny_base(server)).load(),
                 lambda load: load["running"] == 2)
        mine = bob.post("/v1/predictions", json=body).json()
        done = {pid: _finished(alice, pid) for pid in ids}
        bobs = _finished(bob, mine["id"])
        assert bobs["status"] == "succeeded"
        before_bob = [pid for pid in ids if done[pid]["completed_at"] < bobs["completed_at"]]
        assert len(before_bob) <= 3, (len(before_bob), bobs["metrics"])  # the 2 running, and one slot more
        generating = max(p["metrics"]["output_token_count"] / p["metrics"]["tokens_per_second"] for p in done.values())
        assert bobs["metrics"]["predict_time"] <= 2 * generating + 1.0, (bobs["metrics"], generating)


def _tiny_base(server) -> str:
    found = server.store.find_version("judy", TINY)
    assert found is not None
    return found[1].base_name


def _finished(client: httpx.Client, pid: str) -> dict:
    return wait_for(lambda: client.get(f"/v1/predictions/{pid}").json(),
                    lambda p: p["status"] in ("succeeded", "failed", "canceled"), timeout=120)
