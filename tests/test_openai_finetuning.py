"""OpenAI's fine-tuning guide, step by step, with the OFFICIAL `openai` client, unchanged, against a
live tunery server on loopback (an embedded worker, SQLite, the tiny random Llama): upload a chat
file, create a job, follow its events until it succeeds, list its checkpoints, read its results
file, chat with the fine-tuned model (streamed and not), delete it. Also: a bad file is refused
with its line numbers, cancel, pause then resume (from a checkpoint) to success, list filters,
and a DPO job (which needs the DPO training of the `dpo` branch)."""

from __future__ import annotations

import csv
import io
import json
import re
import time

import pytest

openai = pytest.importorskip("openai")

from conftest import write_jsonl  # noqa: E402
from test_api_support import LiveServer  # noqa: E402
from tunery.server.openai.fine_tuning import resolve_hyperparameters  # noqa: E402
from tunery.store.models import Training  # noqa: E402

COLORS = ["red", "blue", "green", "yellow", "black", "white"]
ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow"]
FINAL = ("succeeded", "failed", "cancelled")


def chat_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        c, a = COLORS[i % 6], ANIMALS[(i * 5) % 6]
        rows.append({"messages": [{"role": "system", "content": "Name the animal."},
                                  {"role": "user", "content": f"Item: the {c} {a}."},
                                  {"role": "assistant", "content": a}]})
    return rows


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    # No timed checkpoints: checkpoints come at each epoch's end, and where a pause stops a training.
    live = LiveServer(tmp_path_factory.mktemp("openai-ft"), start_workers=True, checkpoint_minutes=0)
    live.store.ensure_base_models([("tiny", "a tiny random Llama", str(tiny_model_dir))])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=server.store.create_token("alice"),
                         max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat_file(client, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("data") / "animals.jsonl", chat_rows())
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune")


def wait_for(client, job_id: str, statuses=FINAL, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status} after {timeout}s"
        time.sleep(0.3)


def logs_of(server, job_id: str) -> str:
    row = server.store.load_training(job_id.removeprefix("ftjob-"))
    return row.logs if row else ""


def test_the_fine_tuning_guide(server, client, chat_file):
    # "Upload a training file": validated at once.
    assert chat_file.id.startswith("file-") and chat_file.purpose == "fine-tune"
    assert chat_file.status == "processed" and chat_file.status_details is None
    assert chat_file.filename == "animals.jsonl" and chat_file.bytes > 0
    assert client.files.retrieve(chat_file.id).id == chat_file.id
    assert client.files.content(chat_file.id).text.count("\n") == 12

    validation = client.files.create(file=("valid.jsonl", "".join(json.dumps(r) + "\n" for r in chat_rows(4))),
                                     purpose="fine-tune")
    assert validation.status == "processed"

    # "Create a fine-tuned model".
    job = client.fine_tuning.jobs.create(
        training_file=chat_file.id, validation_file=validation.id, model="tunery/tiny", suffix="animals", seed=7,
        metadata={"team": "zoo"},
        method={"type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4,
                                                   "learning_rate_multiplier": "auto"}}})
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job" and job.status == "queued"
    assert job.model == "tunery/tiny" and job.training_file == chat_file.id and job.validation_file == validation.id
    assert (job.seed, job.metadata, job.user_provided_suffix) == (7, {"team": "zoo"}, "animals")
    assert job.hyperparameters.model_dump() == {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 0.1}
    assert job.method.type == "supervised"
    assert job.method.supervised.hyperparameters.learning_rate_multiplier == 0.1
    assert job.fine_tuned_model is None and job.finished_at is None and job.result_files == []
    assert job.integrations == [] and job.organization_id == "alice"
    training = server.store.load_training(job.id.removeprefix("ftjob-"))
    assert training.input["learning_rate"] == pytest.approx(1e-4) and training.input["seed"] == 7

    # "Analyze": follow the events until the job ends.
    seen: dict[str, object] = {}
    deadline = time.monotonic() + 300
    while True:
        for event in client.fine_tuning.jobs.list_events(job.id, limit=100):
            seen[event.id] = event
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in FINAL:
            break
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(0.5)
    assert job.status == "succeeded", f"{job.error}\n{logs_of(server, job.id)}"
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message == "The job has successfully completed"  # newest first
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    metrics = [e for e in events if e.type == "metrics"]
    assert sorted(e.data["step"] for e in metrics) == [1, 2, 3]
    assert all(e.data["total_steps"] == 3 and e.data["train_loss"] > 0 for e in metrics)
    assert [e.data["step"] for e in metrics if "valid_loss" in e.data] == [3]  # validated after the one epoch
    # the mean token accuracy, measured at each step and at the validation
    assert all(0.0 <= e.data["train_mean_token_accuracy"] <= 1.0 for e in metrics)
    assert [e.data["step"] for e in metrics if "valid_mean_token_accuracy" in e.data] == [3]
    assert any(e.message == f"New fine-tuned model created: {job.fine_tuned_model}" for e in events)
    # Evaluated, base against tuned, on the rows held out for validation (the validation file's).
    [evaluated] = [e for e in events if e.message.startswith("Evaluated on the held-out rows, base → tuned: loss ")]
    assert set(evaluated.data["eval"]) == {"base", "tuned"} and evaluated.data["eval_seconds"] > 0
    page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert [e.id for e in page.data] == [e.id for e in events[:2]] and page.has_more
    older = client.fine_tuning.jobs.list_events(job.id, limit=2, after=page.data[-1].id)
    assert [e.id for e in older.data] == [e.id for e in events[2:4]]

    assert job.fine_tuned_model == f"ft:tunery/tiny:alice:animals:{job.id.removeprefix('ftjob-')}"
    assert job.finished_at >= job.created_at and job.trained_tokens > 0 and job.estimated_finish is None

    # Checkpoints: the final step's, named after the fine-tuned model.
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number == 3
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-3"
    assert checkpoints[0].id.startswith("ftckpt-") and checkpoints[0].fine_tuning_job_id == job.id
    assert checkpoints[0].metrics.step == 3 and checkpoints[0].metrics.train_loss > 0
    assert [c.step_number for c in checkpoints] == sorted((c.step_number for c in checkpoints), reverse=True)

    # The results file: OpenAI's metrics CSV.
    [result_id] = job.result_files
    result = client.files.retrieve(result_id)
    assert result.purpose == "fine-tune-results" and result.filename == "step_metrics.csv"
    table = list(csv.DictReader(io.StringIO(client.files.content(result_id).text)))
    assert [int(r["step"]) for r in table] == [1, 2, 3]
    assert list(table[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert all(float(r["train_loss"]) > 0 for r in table)
    assert [r["valid_loss"] != "" for r in table] == [False, False, True]
    assert all(0.0 <= float(r["train_accuracy"]) <= 1.0 for r in table)
    assert [r["valid_mean_token_accuracy"] != "" for r in table] == [False, False, True]
    assert checkpoints[0].metrics.valid_loss == pytest.approx(float(table[-1]["valid_loss"]))
    assert checkpoints[0].metrics.valid_mean_token_accuracy == pytest.approx(
        float(table[-1]["valid_mean_token_accuracy"]))
    assert checkpoints[0].metrics.train_mean_token_accuracy == pytest.approx(float(table[-1]["train_accuracy"]))
    assert client.fine_tuning.jobs.retrieve(job.id).result_files == [result_id]  # made once

    # "Use a fine-tuned model".
    messages = [{"role": "system", "content": "Name the animal."}, {"role": "user", "content": "Item: the red cat."}]
    reply = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=5,
                                           temperature=0)
    assert reply.model == job.fine_tuned_model and reply.choices[0].message.role == "assistant"
    assert 1 <= reply.usage.completion_tokens <= 5
    chunks = list(client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=5,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    completion = client.completions.create(model=job.fine_tuned_model, prompt="Item: the red cat.", max_tokens=3,
                                           temperature=0)
    assert completion.model == job.fine_tuned_model and completion.usage.completion_tokens <= 3
    final = client.chat.completions.create(model=checkpoints[0].fine_tuned_model_checkpoint, messages=messages,
                                           max_tokens=5, temperature=0)
    assert final.choices[0].message.content == reply.choices[0].message.content
    assert job.fine_tuned_model in {m.id for m in client.models.list()}
    assert client.models.retrieve(job.fine_tuned_model).owned_by == "alice"
    assert not any(m.id.startswith("alice/ftjob-") for m in client.models.list())

    # Delete it: no longer listed or served; the job stays.
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete("tunery/tiny")
    deleted = client.models.delete(job.fine_tuned_model)
    assert (deleted.id, deleted.deleted) == (job.fine_tuned_model, True)
    assert job.fine_tuned_model not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(job.fine_tuned_model)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.delete(job.fine_tuned_model)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"


def test_a_bad_file_is_reported_by_line_and_no_job_starts(server, client, tmp_path):
    rows = chat_rows(4)
    rows[2] = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [*rows, "{not json"])
    with open(path, "rb") as f:
        bad = client.files.create(file=f, purpose="fine-tune")
    assert bad.status == "error"
    assert "line 3: messages[1].role" in bad.status_details and "line 5" in bad.status_details
    before = server.count(Training)
    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.create(training_file=bad.id, model="tunery/tiny")
    err = raised.value
    assert err.code == "invalid_training_file" and err.param == "training_file" and err.type == "invalid_request_error"
    assert "line 3: messages[1].role" in err.message and "line 5" in err.message
    assert server.count(Training) == before

    # Other refusals, all in OpenAI's shape, none leaving a job behind.
    with pytest.raises(openai.BadRequestError) as raised:
        with open(path, "rb") as f:
            client.files.create(file=f, purpose="assistants")
    assert raised.value.param == "purpose"
    good = client.files.list(purpose="fine-tune").data[-1]
    for kwargs, param in [({"model": "tunery/nothing"}, "model"),
                          ({"model": "ft:tunery/tiny:alice::abc"}, "model"),
                          ({"model": "tunery/tiny", "suffix": "a:b"}, "suffix"),
                          ({"model": "tunery/tiny", "hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
                          ({"model": "tunery/tiny", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata")]:
        with pytest.raises(openai.BadRequestError) as raised:
            client.fine_tuning.jobs.create(training_file=good.id, **kwargs)
        assert raised.value.param == param, raised.value.message
    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.create(training_file="file-nothing", model="tunery/tiny")
    assert raised.value.code == "invalid_training_file"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nothing")
    assert server.count(Training) == before


def test_pause_then_resume_from_a_checkpoint_reaches_succeeded(server, client, chat_file):
    # 300 steps (batch_size auto: 1 for 12 rows), so that the pause lands well before the end.
    job = client.fine_tuning.jobs.create(training_file=chat_file.id, model="tiny",
                                         hyperparameters={"n_epochs": 25, "batch_size": "auto"})
    assert job.hyperparameters.model_dump() == {"n_epochs": 25, "batch_size": 1, "learning_rate_multiplier": 0.1}
    assert job.user_provided_suffix is None and job.fine_tuned_model is None

    deadline = time.monotonic() + 300
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=5)):
        assert time.monotonic() < deadline and client.fine_tuning.jobs.retrieve(job.id).status not in FINAL
        time.sleep(0.3)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status in ("running", "paused")
    paused = wait_for(client, job.id, statuses=("paused", *FINAL), timeout=60)
    assert paused.status == "paused", logs_of(server, job.id)
    kept = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert kept, "a paused job keeps its checkpoints"
    # The training saved a checkpoint at the step it stopped at (not only at an epoch's end), so
    # nothing done before the pause is done again.
    reached = max(e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)
                  if e.type == "metrics")
    assert 0 < reached < 300
    assert kept[0].step_number == reached, (kept, logs_of(server, job.id))
    assert f"paused after saving checkpoint-{reached} (resumes from it)" in logs_of(server, job.id)
    time.sleep(2)  # nothing runs while paused
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    # Replicate's API (and its client, which knows no "paused") sees it waiting, flagged paused.
    import replicate

    training = replicate.Client(api_token=client.api_key, base_url=server.url).trainings.get(
        job.id.removeprefix("ftjob-"))
    assert training.status == "starting"
    assert server.client("alice").get(f"/v1/trainings/{training.id}").json()["paused"] is True
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.pause(job.id)

    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(job.id)
    done = wait_for(client, job.id)
    assert done.status == "succeeded", f"{done.error}\n{logs_of(server, job.id)}"
    logs = logs_of(server, job.id)
    assert re.search(rf"resuming from \S*checkpoint-{reached}\n", logs), logs
    steps = sorted(e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)
                   if e.type == "metrics")
    assert steps == list(range(1, 301))
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert "Fine-tuning job paused" in messages and "Fine-tuning job resumed" in messages
    assert done.fine_tuned_model.startswith("ft:tunery/tiny:alice::")
    assert client.chat.completions.create(model=done.fine_tuned_model, max_tokens=2,
                                          messages=[{"role": "user", "content": "hi"}]).choices
    # An earlier checkpoint the run keeps is a model of its own, served from that checkpoint's
    # weights; a step the run did not keep is not found.
    kept_steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(done.id).data]
    earlier = [c for c in client.fine_tuning.jobs.checkpoints.list(done.id).data if c.step_number < 300]
    assert earlier and 300 in kept_steps
    gone = next(step for step in range(1, 300) if step not in kept_steps)
    hi = [{"role": "user", "content": "Item: the red cat."}]
    then = client.chat.completions.create(model=earlier[0].fine_tuned_model_checkpoint, max_tokens=4,
                                          temperature=0, messages=hi)
    assert then.model == earlier[0].fine_tuned_model_checkpoint and then.choices[0].message.role == "assistant"
    assert client.models.retrieve(earlier[0].fine_tuned_model_checkpoint).id == earlier[0].fine_tuned_model_checkpoint
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=f"{done.fine_tuned_model}:ckpt-step-{gone}", max_tokens=2, messages=hi)


def test_cancel_and_list_filters(server, client, chat_file):
    many = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}}
    running = client.fine_tuning.jobs.create(training_file=chat_file.id, model="tunery/tiny", method=many,
                                             metadata={"team": "cancel", "run": "1"})
    # Every hyperparameter "auto": 12 rows → 9 epochs (at least 100 examples), batch 1, multiplier 0.1.
    queued = client.fine_tuning.jobs.create(training_file=chat_file.id, model="tunery/tiny",
                                            hyperparameters={"n_epochs": "auto", "batch_size": "auto",
                                                             "learning_rate_multiplier": "auto"},
                                            metadata={"team": "cancel", "run": "2"})
    assert queued.hyperparameters.model_dump() == {"n_epochs": 9, "batch_size": 1, "learning_rate_multiplier": 0.1}
    assert queued.status == "queued"
    # Queued behind the other (one worker): cancelled at once; a second cancel is refused.
    assert client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(queued.id)
    wait_for(client, running.id, statuses=("running", *FINAL), timeout=120)
    client.fine_tuning.jobs.cancel(running.id)
    t0 = time.monotonic()
    assert wait_for(client, running.id, timeout=60).status == "cancelled"
    assert time.monotonic() - t0 < 30
    events = client.fine_tuning.jobs.list_events(running.id).data
    assert events[0].message == "Fine-tuning job cancelled"

    # Lists: newest first, metadata filters, pages.
    team = client.fine_tuning.jobs.list(metadata={"team": "cancel"}).data
    assert [j.id for j in team] == [queued.id, running.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "cancel", "run": "1"})] == [running.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "nobody"}).data == []
    first = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in first.data] == [queued.id] and first.has_more
    assert client.fine_tuning.jobs.list(limit=1, after=queued.id).data[0].id == running.id
    everything = [j.id for j in client.fine_tuning.jobs.list(limit=2)]  # auto-paginates
    assert everything[:2] == [queued.id, running.id]
    assert everything == [j.id for j in client.fine_tuning.jobs.list(limit=100).data]

    extra = [client.files.create(file=(f"extra{i}.jsonl", b'{"text": "hello"}\n'), purpose="fine-tune")
             for i in range(2)]
    assert all(f.status == "processed" for f in extra)
    files = client.files.list(purpose="fine-tune")
    assert chat_file.id in {f.id for f in files.data} and all(f.purpose == "fine-tune" for f in files.data)
    newest_first = [f.id for f in client.files.list().data]
    assert len(newest_first) >= 3 and all(i.startswith("file-") for i in newest_first)
    assert [f.id for f in client.files.list(order="asc").data] == newest_first[::-1]
    one = client.files.list(order="asc", limit=1)
    assert [f.id for f in one.data] == newest_first[-1:] and one.has_more
    assert [f.id for f in client.files.list(order="asc", limit=2, after=one.data[0].id).data] == \
        newest_first[-3:-1][::-1]
    assert [f.id for f in client.files.list(limit=2, after=newest_first[0]).data] == newest_first[1:3]

    # Bob's token can not see alice's jobs or files.
    bob = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=server.store.create_token("bob"), max_retries=0)
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.retrieve(running.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(chat_file.id)
    assert bob.fine_tuning.jobs.list().data == []
    # A file deleted is gone.
    assert client.files.delete(extra[0].id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(extra[0].id)
    assert extra[0].id not in {f.id for f in client.files.list().data}


def test_the_auto_rule():
    assert resolve_hyperparameters(12, {}, "sft") == {"n_epochs": 9, "batch_size": 1, "learning_rate_multiplier": 0.1}
    assert resolve_hyperparameters(30, {}, "sft")["n_epochs"] == 4  # 3 × 30 < 100: ceil(100 / 30)
    assert resolve_hyperparameters(1000, {}, "sft") == {"n_epochs": 3, "batch_size": 2,
                                                        "learning_rate_multiplier": 0.1}
    assert resolve_hyperparameters(20_000, {"batch_size": 8}, "sft") == {"n_epochs": 1, "batch_size": 8,
                                                                         "learning_rate_multiplier": 0.1}
    assert resolve_hyperparameters(2, {}, "sft")["n_epochs"] == 25
    assert resolve_hyperparameters(10**6, {}, "sft")["batch_size"] == 256
    assert resolve_hyperparameters(100, {"beta": "auto"}, "dpo")["beta"] == 0.1
    assert resolve_hyperparameters(100, {"beta": 0.3, "n_epochs": 2}, "dpo")["beta"] == 0.3


def test_a_dpo_job_on_a_preference_file(server, client, tmp_path):
    rows = [{"input": {"messages": [{"role": "user", "content": f"Item: the {c} {a}."}]},
             "preferred_output": [{"role": "assistant", "content": a}],
             "non_preferred_output": [{"role": "assistant", "content": "I do not know"}]}
            for c, a in zip(COLORS, ANIMALS, strict=True)]
    with open(write_jsonl(tmp_path / "prefs.jsonl", rows), "rb") as f:
        prefs = client.files.create(file=f, purpose="fine-tune")
    assert prefs.status == "processed", prefs.status_details
    job = client.fine_tuning.jobs.create(training_file=prefs.id, model="tunery/tiny", suffix="prefs",
                                         method={"type": "dpo", "dpo": {"hyperparameters": {
                                             "beta": 0.1, "n_epochs": 1, "batch_size": 2}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    training = server.store.load_training(job.id.removeprefix("ftjob-"))
    assert training.input["method"] == "dpo" and training.input["dpo_beta"] == 0.1
    done = wait_for(client, job.id)
    assert done.status == "succeeded", f"{done.error}\n{logs_of(server, job.id)}"
    # The guide's steps on a DPO job: its events carry the reward metrics, as do its checkpoints and
    # its results file, and the ft: model answers, streamed and not.
    metrics = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert metrics and all("train_reward_accuracy" in e.data and "train_reward_margin" in e.data for e in metrics)
    assert all(0 <= e.data["train_reward_accuracy"] <= 1 for e in metrics)
    assert "reward accuracy=" in metrics[0].message
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and "train_reward_accuracy" in checkpoints[0].metrics.model_dump()
    table = list(csv.DictReader(io.StringIO(client.files.content(done.result_files[0]).text)))
    assert len(table) == len(metrics) and table[-1]["train_reward_margin"] != ""
    reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=3, temperature=0,
                                           messages=[{"role": "user", "content": "Item: the red cat."}])
    assert reply.choices[0].message.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=done.fine_tuned_model, max_tokens=3, stream=True, temperature=0,
        messages=[{"role": "user", "content": "Item: the red cat."}]) if c.choices)
    assert streamed == reply.choices[0].message.content
    # A supervised job on preference rows, and a DPO job on chat rows, are refused.
    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.create(training_file=prefs.id, model="tunery/tiny")
    assert raised.value.code == "invalid_training_file"
    with open(write_jsonl(tmp_path / "chat.jsonl", chat_rows(4)), "rb") as f:
        chat = client.files.create(file=f, purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.create(training_file=chat.id, model="tunery/tiny", method={"type": "dpo"})
    assert raised.value.code == "invalid_training_file" and "preference" in raised.value.message


def test_a_job_runs_on_a_worker_with_another_home(tmp_path_factory, tiny_model_dir):
    """The job's files are read from the storage: a worker on another machine (another home, the same
    database and storage) trains it, and the server serves the result."""
    import threading

    from tunery.settings import Settings
    from tunery.store import Store
    from tunery.worker.runner import Worker

    root = tmp_path_factory.mktemp("openai-ft-homes")
    live = LiveServer(root / "server-home", start_workers=False, storage_url=str(root / "storage"))
    try:
        live.store.ensure_base_models([("tiny", "a tiny random Llama", str(tiny_model_dir))])
        client = openai.OpenAI(base_url=f"{live.url}/openai/v1", api_key=live.store.create_token("carol"),
                               max_retries=0, timeout=120)
        upload = client.files.create(file=("chat.jsonl", "".join(json.dumps(r) + "\n" for r in chat_rows(8))),
                                     purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=upload.id, model="tunery/tiny", suffix="remote",
                                             hyperparameters={"n_epochs": 1, "batch_size": 4})
        # A job whose file is deleted before a worker takes it fails, with OpenAI's error object.
        doomed_file = client.files.create(file=("gone.jsonl", '{"text": "soon gone"}\n'), purpose="fine-tune")
        doomed = client.fine_tuning.jobs.create(training_file=doomed_file.id, model="tunery/tiny")
        client.files.delete(doomed_file.id)
        training = live.store.load_training(job.id.removeprefix("ftjob-"))
        assert training.job["data"]["train_data"].startswith(str(root / "storage"))

        elsewhere = Settings(home=root / "worker-home", database_url=live.settings.database_url,
                             storage_url=str(root / "storage"))
        store = Store(elsewhere.db_url, migrate=False)
        try:
            worker = Worker(store, elsewhere, poll_interval=0.2)
            assert worker.run_once(threading.Event()) and worker.run_once(threading.Event())
        finally:
            store.close()
        done = client.fine_tuning.jobs.retrieve(job.id)
        assert done.status == "succeeded", f"{done.error}\n{logs_of(live, job.id)}"
        assert live.store.load_training(done.id.removeprefix("ftjob-")).run_url.startswith(str(root / "storage"))
        reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=2,
                                               messages=[{"role": "user", "content": "Item: the red cat."}])
        assert reply.choices[0].message.role == "assistant"
        assert len(client.fine_tuning.jobs.checkpoints.list(done.id).data) >= 1
        failed = client.fine_tuning.jobs.retrieve(doomed.id)
        assert failed.status == "failed" and failed.fine_tuned_model is None and failed.result_files == []
        assert failed.error.code == "training_failed" and "gone.jsonl" in failed.error.message
        assert failed.finished_at is not None and failed.trained_tokens is None
        assert client.fine_tuning.jobs.list_events(doomed.id).data[0].level == "error"
    finally:
        live.stop()
