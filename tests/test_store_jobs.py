"""The job lifecycle in the store, on real SQLite files and a real PostgreSQL: atomic claims under
races, leases that expire and pass to another worker, cancel in each state, and the webhook
outbox rows each change writes."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from tunery.server.replicate.shapes import webhook_body
from tunery.store import Store, base_version_id
from tunery.store.models import Training, WebhookDelivery, utcnow


@pytest.fixture
def store(db_url):
    s = Store(db_url, base_url="http://tunery.test", webhook_body=webhook_body)
    s.ensure_base_models([("smollm2-135m", None, "smollm2-135m")])
    s.create_model("alice", "dest")
    yield s
    s.close()


def _training(store: Store, **kw) -> Training:
    return store.create_training("alice", model="tunery/smollm2-135m",
                                 version_id=base_version_id("smollm2-135m"), destination="alice/dest",
                                 input={"train_data": "x"}, job={"base": "smollm2-135m"}, **kw)


def _race(db_url: str, count: int, work) -> list:
    """Run `work(store, i)` in `count` threads at once, each with its own Store (its own engine
    and connections, as separate processes would); their results in order. A thread's exception
    fails the test instead of vanishing."""
    stores = [Store(db_url, migrate=False) for _ in range(count)]
    results: list = [None] * count
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(stores[i], i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in stores:
        s.close()
    assert errors == []
    return results


def _expire_lease(store: Store, training_id: str) -> None:
    with store.session() as s:
        s.execute(update(Training).where(Training.id == training_id)
                  .values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_racing_workers_claim_every_job_exactly_once(store, db_url):
    store.set_limits("alice", {"trainings": 0})  # no limit on running trainings (test_limits has them)
    jobs = {_training(store).id for _ in range(12)}

    def work(worker: Store, i: int) -> list[str]:
        name, mine = f"w{i}", []
        while (row := worker.claim_training(name, 60)) is not None:
            mine.append(row.id)
        return mine

    claims = {f"w{i}": ids for i, ids in enumerate(_race(db_url, 6, work))}
    claimed = [job for ids in claims.values() for job in ids]
    assert sorted(claimed) == sorted(jobs)  # all of them, none twice
    for name, ids in claims.items():
        for job in ids:
            row = store.load_training(job)
            assert (row.status, row.lease_owner, row.attempts) == ("processing", name, 1)


def test_claim_takes_the_oldest_first(store):
    first, second = _training(store), _training(store)
    assert store.claim_training("w1", 30).id == first.id
    assert store.claim_training("w1", 30).id == second.id
    assert store.claim_training("w1", 30) is None


def test_an_expired_lease_passes_to_another_worker(store):
    training = _training(store)
    claimed = store.claim_training("w1", 30)
    started_at = claimed.started_at
    assert store.heartbeat(training.id, "w1", 30) == "ok"
    assert store.claim_training("w2", 30) is None  # the lease still holds

    _expire_lease(store, training.id)  # w1 died and stopped heartbeating
    again = store.claim_training("w2", 30)
    assert (again.id, again.lease_owner, again.attempts) == (training.id, "w2", 2)
    assert again.started_at == started_at

    # w1 comes back: everything it says is ignored, and it is told to drop the job.
    assert store.heartbeat(training.id, "w1", 30) == "lost"
    store.append_training_logs(training.id, "w1", "stale\n", metrics={"loss": 9.0})
    assert store.finish_training(training.id, "w1", status="failed", error="stale") is None
    assert store.succeed_training(training.id, "w1", run_url="/x", weights_url="u", metrics={}) is None
    row = store.load_training(training.id)
    assert (row.status, row.logs, row.metrics, row.lease_owner) == ("processing", "", {}, "w2")

    store.append_training_logs(training.id, "w2", "step 1\n", metrics={"loss": 1.5})
    store.append_training_logs(training.id, "w2", "step 2\n", metrics={"step": 2})
    row = store.finish_training(training.id, "w2", status="failed", error="boom")
    assert (row.status, row.error, row.logs, row.metrics) == ("failed", "boom", "step 1\nstep 2\n",
                                                              {"loss": 1.5, "step": 2})
    assert row.lease_owner is None and row.completed_at is not None
    assert store.heartbeat(training.id, "w2", 30) == "lost"  # finished: nobody holds it
    _expire_lease(store, training.id)
    assert store.claim_training("w3", 30) is None


def test_a_job_that_keeps_killing_workers_fails(store):
    training = _training(store)
    for i in range(5):
        assert store.claim_training(f"w{i}", 30).attempts == i + 1
        _expire_lease(store, training.id)
    assert store.claim_training("w9", 30) is None
    row = store.load_training(training.id)
    assert row.status == "failed" and "lost 5 times" in row.error


def test_cancel_in_each_state(store):
    queued = _training(store)
    row = store.cancel_training("alice", queued.id)
    assert (row.status, row.completed_at is not None) == ("canceled", True)
    assert store.claim_training("w1", 30) is None  # a canceled job is never run

    running = _training(store)
    store.claim_training("w1", 30)
    row = store.cancel_training("alice", running.id)
    assert (row.status, row.cancel_requested) == ("processing", True)  # the worker finishes it
    assert store.heartbeat(running.id, "w1", 30) == "cancel"
    assert store.finish_training(running.id, "w1", status="canceled").status == "canceled"

    done = _training(store)
    store.claim_training("w1", 30)
    store.succeed_training(done.id, "w1", run_url="/x", weights_url="u", metrics={})
    row = store.cancel_training("alice", done.id)
    assert (row.status, row.cancel_requested) == ("succeeded", False)

    # A cancel asked of a job whose worker then died: the next claim ends it instead of running it.
    orphan = _training(store)
    store.claim_training("w1", 30)
    store.cancel_training("alice", orphan.id)
    _expire_lease(store, orphan.id)
    assert store.claim_training("w2", 30) is None
    assert store.load_training(orphan.id).status == "canceled"


def test_succeeding_creates_a_version_on_the_destination(store):
    training = _training(store)
    store.claim_training("w1", 30)
    row, version = store.succeed_training(training.id, "w1", run_url="/runs/t", weights_url="http://w",
                                          metrics={"train_loss": 0.5})
    dest = store.get_model("alice", "alice", "dest")
    assert row.status == "succeeded" and row.output["version"] == f"alice/dest:{version.id}"
    assert (row.output["weights"], row.metrics["train_loss"], row.run_url) == ("http://w", 0.5, "/runs/t")
    assert store.latest_version(dest.id).id == version.id
    assert (version.base_name, version.run_url) == ("smollm2-135m", "/runs/t")
    assert version.training_id == training.id


def test_prediction_lifecycle(store):
    p = store.create_prediction("alice", model="tunery/smollm2-135m",
                                version_id=base_version_id("smollm2-135m"), input={"prompt": "hi"},
                                stream=True)
    assert store.get_model("alice", "tunery", "smollm2-135m").run_count == 1
    assert store.start_prediction(p.id).status == "processing"
    assert store.start_prediction(p.id) is None  # only once
    assert store.set_predictions_output({p.id: ["a", "b"]}) == set()
    assert store.get_prediction("alice", p.id).output == ["a", "b"]
    assert store.cancel_prediction("alice", p.id).status == "processing"
    assert store.is_cancel_requested_prediction(p.id)
    assert store.set_predictions_output({}, watch=[p.id, "unknown"]) == {p.id}  # the flusher learns of it
    row = store.finish_prediction(p.id, status="canceled", output=["a", "b", "c"],
                                  metrics={"predict_time": 0.1})
    assert (row.status, row.output, row.metrics["predict_time"]) == ("canceled", ["a", "b", "c"], 0.1)
    assert store.finish_prediction(p.id, status="succeeded").status == "canceled"  # final stays final

    queued = store.create_prediction("alice", model="tunery/smollm2-135m", version_id="v", input={})
    assert store.cancel_prediction("alice", queued.id).status == "canceled"
    assert store.start_prediction(queued.id) is None


def _events(store: Store, object_id: str) -> list[str]:
    return [d.event for d in store.webhook_deliveries(object_id)]


def test_webhook_outbox_rows_follow_the_filter(store):
    everything = _training(store, webhook="http://hook.test/a")
    only_completed = _training(store, webhook="http://hook.test/b", webhook_events_filter=["completed"])
    no_hook = _training(store)
    for t in (everything, only_completed, no_hook):
        store.claim_training("w1", 30)
        store.append_training_logs(t.id, "w1", "line 1\n")
        store.succeed_training(t.id, "w1", run_url="/x", weights_url="u", metrics={})
    assert _events(store, everything.id) == ["start", "logs", "completed"]
    assert _events(store, only_completed.id) == ["completed"]
    assert _events(store, no_hook.id) == []

    deliveries = store.webhook_deliveries(everything.id)
    assert {d.url for d in deliveries} == {"http://hook.test/a"}
    start, completed = json.loads(deliveries[0].body), json.loads(deliveries[-1].body)
    assert (start["id"], start["status"], completed["status"]) == (everything.id, "processing", "succeeded")
    assert completed["output"]["version"].startswith("alice/dest:")
    assert completed["urls"]["get"] == f"http://tunery.test/v1/trainings/{everything.id}"

    canceled = store.create_prediction("alice", model="m/n", version_id="v", input={},
                                       webhook="http://hook.test/p",
                                       webhook_events_filter=["start", "completed"])
    store.cancel_prediction("alice", canceled.id)
    assert _events(store, canceled.id) == ["completed"]


def test_logs_and_output_webhooks_are_throttled(store):
    training = _training(store, webhook="http://hook.test/t")
    store.claim_training("w1", 30)
    for i in range(5):  # well within 500 ms
        store.append_training_logs(training.id, "w1", f"line {i}\n")
    logs = [d for d in store.webhook_deliveries(training.id) if d.event == "logs"]
    assert len(logs) == 1
    assert json.loads(logs[0].body)["logs"] == "".join(f"line {i}\n" for i in range(5))  # the newest state

    # Once a logs delivery is sent, another within 500 ms is dropped; after 500 ms one is queued again.
    store.mark_webhook(logs[0].id, ok=True)
    store.append_training_logs(training.id, "w1", "line 5\n")
    assert _events(store, training.id) == ["start", "logs"]
    with store.session() as s:
        s.execute(update(WebhookDelivery).values(created_at=utcnow() - timedelta(seconds=1)))
    store.append_training_logs(training.id, "w1", "line 6\n")
    assert _events(store, training.id) == ["start", "logs", "logs"]

    p = store.create_prediction("alice", model="m/n", version_id="v", input={}, webhook="http://hook.test/p")
    store.start_prediction(p.id)
    for i in range(4):
        store.set_predictions_output({p.id: [str(j) for j in range(i + 1)]})
    store.finish_prediction(p.id, status="succeeded", output=["0", "1", "2", "3", "4"])
    assert _events(store, p.id) == ["start", "output", "completed"]
    assert json.loads(store.webhook_deliveries(p.id)[-1].body)["output"] == ["0", "1", "2", "3", "4"]


def test_due_webhooks_back_off_and_give_up(store):
    training = _training(store, webhook="http://hook.test/t", webhook_events_filter=["start"])
    store.claim_training("w1", 30)
    (due,) = store.due_webhooks()
    assert store.due_webhooks() == []  # held by the first caller
    for attempt in range(1, 9):
        store.mark_webhook(due.id, ok=False, error="HTTP 500")
        (row,) = store.webhook_deliveries(training.id)
        assert row.attempts == attempt and row.last_error == "HTTP 500"
        wait = (row.next_attempt_at - utcnow()).total_seconds()
        assert 2 ** (attempt - 1) - 1 < wait <= 2 ** (attempt - 1)
        with store.session() as s:  # skip the wait
            s.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))
        due_now = store.due_webhooks()
        assert len(due_now) == (1 if attempt < 8 else 0)  # eight attempts, then it gives up


def test_a_released_training_is_resumed_at_once(store):
    training = _training(store)
    store.claim_training("w1", 30)
    assert store.release_training(training.id, "w2") is False  # not its job
    assert store.release_training(training.id, "w1") is True  # w1 shuts down
    assert store.heartbeat(training.id, "w1", 30) == "lost"
    again = store.claim_training("w2", 30)
    assert (again.id, again.attempts, again.status) == (training.id, 1, "processing")  # not counted as lost


def test_prediction_leases_are_taken_over_only_when_expired_and_by_one_server(store, db_url):
    from tunery.store.models import Prediction

    version = base_version_id("smollm2-135m")

    def prediction(runner, lease_seconds=30.0, start=False):
        row = store.create_prediction("alice", model="tunery/smollm2-135m", version_id=version,
                                      input={"prompt": "p"}, runner=runner, lease_seconds=lease_seconds)
        if start:
            store.start_prediction(row.id, runner)
            store.set_predictions_output({row.id: ["half"]}, runner)
        return row.id

    live = prediction("live-server", start=True)
    expired = prediction("dead-server", start=True)
    legacy = prediction(None)  # from before leases: no holder
    with store.session() as s:
        s.execute(update(Prediction).where(Prediction.id == expired)
                  .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    canceled = prediction("dead-server", lease_seconds=-1, start=True)
    store.cancel_prediction("alice", canceled)

    # Another server's writes to a prediction it does not hold are ignored.
    store.set_predictions_output({live: ["intruder"]}, "other-server")
    assert store.finish_prediction(live, status="succeeded", runner="other-server") is None

    taken = _race(db_url, 4, lambda server, i: [row.id for row, _ in
                                                 server.adopt_orphaned_predictions(f"server-{i}", 30)])
    everything = [pid for ids in taken for pid in ids]
    assert sorted(everything) == sorted([expired, legacy])  # each once; never the live one
    with store.session() as s:
        rows = {pid: s.get(Prediction, pid) for pid in (live, expired, legacy, canceled)}
        assert rows[live].lease_owner == "live-server" and rows[live].output == ["half"]
        assert rows[live].status == "processing"
        assert rows[expired].status == "starting" and rows[expired].output is None
        assert rows[expired].lease_owner.startswith("server-") and rows[expired].lease_expires_at > utcnow()
        assert rows[canceled].status == "canceled"
    assert store.renew_prediction_leases("live-server", 30) == 1


def test_pause_and_resume_in_each_state(store):
    # Queued: paused at once, not claimed while paused; resumed: queued again.
    queued = _training(store)
    assert store.pause_training("alice", queued.id).status == "paused"
    assert store.claim_training("w1", 30) is None
    assert store.resume_training("alice", queued.id).status == "starting"
    claimed = store.claim_training("w1", 30)
    assert claimed.id == queued.id and claimed.attempts == 1

    # Running: flagged, the worker hears "pause" and stops it; the claim is not a lost attempt.
    assert store.pause_training("alice", queued.id).status == "processing"
    assert store.heartbeat(queued.id, "w1", 30) == "pause"
    assert store.paused_training(queued.id, "w2") is None  # not its lease
    paused = store.paused_training(queued.id, "w1")
    assert (paused.status, paused.lease_owner, paused.attempts, paused.pause_requested) == ("paused", None, 0, False)
    assert store.heartbeat(queued.id, "w1", 30) == "lost"
    assert store.resume_training("alice", queued.id).status == "starting"
    assert store.claim_training("w2", 30).id == queued.id

    # A pause asked for, then the worker died: the next claim pauses it instead of running it.
    store.pause_training("alice", queued.id)
    _expire_lease(store, queued.id)
    assert store.claim_training("w3", 30) is None
    assert store.load_training(queued.id).status == "paused"

    # A resume before the worker stopped it: the pause is called off and it keeps running.
    other = _training(store)
    store.claim_training("w1", 30)
    store.pause_training("alice", other.id)
    assert store.resume_training("alice", other.id).status == "processing"
    assert store.heartbeat(other.id, "w1", 30) == "ok"

    # Paused: canceled at once. Finished ones are left as they are.
    assert store.cancel_training("alice", queued.id).status == "canceled"
    assert store.pause_training("alice", queued.id).status == "canceled"
    assert store.resume_training("alice", queued.id).status == "canceled"
    assert store.pause_training("bob", other.id) is None


def test_fine_tuning_jobs_are_listed_newest_first_with_metadata_filters(store):
    ids = []
    for i in range(5):
        tid = f"job{i}"
        store.create_training("alice", training_id=tid, destination=f"alice/ftjob-{tid}",
                              model="tunery/smollm2-135m", version_id=base_version_id("smollm2-135m"),
                              input={}, job={}, openai={"metadata": {"even": str(i % 2 == 0)}},
                              new_destination=f"fine-tuned by fine-tuning job ftjob-{tid}")
        ids.append(tid)
    _training(store)  # a Replicate training is not a fine-tuning job
    rows, more = store.list_fine_tuning_jobs("alice", limit=10)
    assert [r.id for r in rows] == ids[::-1] and not more
    rows, more = store.list_fine_tuning_jobs("alice", limit=2, after="job3")
    assert [r.id for r in rows] == ["job2", "job1"] and more
    rows, more = store.list_fine_tuning_jobs("alice", limit=2, metadata={"even": "True"})
    assert [r.id for r in rows] == ["job4", "job2"] and more
    assert store.list_fine_tuning_jobs("bob") == ([], False)
    model = store.get_model("alice", "alice", "ftjob-job0")
    assert model is not None
    store.delete_versions(model.id, [], drop_model=True)
    assert store.get_model("alice", "alice", "ftjob-job0") is None
