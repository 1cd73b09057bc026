"""OpenAI's reinforcement fine-tuning with the OFFICIAL `openai` client against a live tunery server
on loopback (an embedded worker, SQLite, the tiny random Llama): `client.fine_tuning.alpha.graders`
`.validate` and `.run`, as OpenAI's RFT guide uses them to try a grader before a job; then an RFT
job with a multi grader of string_check and python: its events (with the reward metrics, and the
grader's failures as warnings), checkpoints, results file, and the `ft:` model answering. Bad
graders are refused with a 400 naming the field before a job exists; a python grader runs in the
sandbox, and an attacking one scores 0 with the reason while the server goes on."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

openai = pytest.importorskip("openai")

from test_api_support import LiveServer  # noqa: E402

EXACT = {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
         "reference": "{{ item.answer }}", "operation": "eq"}
CODE = {"type": "python", "name": "digits",
        "source": "def grade(sample, item):\n    text = sample['output_text']\n"
                  "    return 1.0 if text.strip().isdigit() else 0.0\n"}
MULTI = {"type": "multi", "name": "answer", "graders": {"exact": EXACT, "digits": CODE},
         "calculate_output": "0.75 * exact + 0.25 * digits"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    live = LiveServer(tmp_path_factory.mktemp("openai-graders"), start_workers=True, checkpoint_minutes=0)
    live.store.ensure_base_models([("tiny", "a tiny random Llama", str(tiny_model_dir))])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=server.store.create_token("alice"),
                         max_retries=0, timeout=120)


def test_validate_answers_the_grader_back(client):
    assert client.fine_tuning.alpha.graders.validate(grader=MULTI).grader.model_dump(exclude_none=True)["name"] \
        == "answer"


@pytest.mark.parametrize("grader, param, words", [
    ({"type": "regex", "name": "r"}, "grader.type", "unknown grader type 'regex'"),
    ({**CODE, "source": "def grade(sample, item):\n    return (\n"}, "grader.source", "does not compile"),
    ({**MULTI, "calculate_output": "exact + missing"}, "grader.calculate_output", "'missing' is not one of"),
    ({**EXACT, "operation": "regex"}, "grader.operation", "'eq', 'ne', 'like' or 'ilike'"),
    ({"type": "score_model", "name": "j", "model": "tunery/absent", "input": [{"role": "user", "content": "x"}]},
     "grader.model", "no model 'tunery/absent' is served here"),
])
def test_bad_graders_are_a_400_naming_the_field(client, grader, param, words):
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.alpha.graders.validate(grader=grader)
    error = exc.value.body
    assert error["param"] == param and words in error["message"] and error["code"] == "invalid_grader", error


def test_run_a_multi_grader(client):
    hit = client.fine_tuning.alpha.graders.run(grader=MULTI, model_sample="42", item={"answer": "42"})
    assert hit.reward == 1.0 and hit.sub_rewards == {"exact": 1.0, "digits": 1.0}
    assert hit.metadata.name == "answer" and hit.metadata.type == "multi"
    assert not any(v for k, v in hit.metadata.errors.model_dump().items() if not k.endswith(("_details", "_type")))
    near = client.fine_tuning.alpha.graders.run(grader=MULTI, model_sample="41", item={"answer": "42"})
    assert near.reward == 0.25 and near.metadata.scores == {"exact": 0.0, "digits": 1.0}


def test_run_an_attacking_python_grader_scores_zero_and_the_server_goes_on(client):
    bomb = {**CODE, "source": "import os\ndef grade(sample, item):\n    while True:\n        os.fork()\n"}
    out = client.fine_tuning.alpha.graders.run(grader=bomb, model_sample="1")
    assert out.reward == 0.0 and out.metadata.errors.python_grader_runtime_error
    assert "PermissionError" in out.metadata.errors.python_grader_runtime_error_details
    assert client.fine_tuning.alpha.graders.run(grader=CODE, model_sample="7").reward == 1.0


def test_run_a_score_model_grader_judged_by_a_served_model(client):
    """The tiny random model is the judge: it answers noise, so the sample scores 0 with a parse
    error, but it did run (its token usage is counted)."""
    judge = {"type": "score_model", "name": "judge", "model": "tunery/tiny", "range": [0, 1],
             "sampling_params": {"max_completions_tokens": 8, "seed": 1},
             "input": [{"role": "user", "content": "Answer: {{ sample.output_text }}. Reference: {{ item.ref }}"}]}
    out = client.fine_tuning.alpha.graders.run(grader=judge, model_sample="Paris", item={"ref": "Paris"})
    usage = out.model_grader_token_usage_per_model["tunery/tiny"]
    assert usage["prompt_tokens"] > 10 and 0 < usage["completion_tokens"] <= 8
    assert out.reward == 0.0 and out.metadata.errors.model_grader_parse_error or 0.0 <= out.reward <= 1.0


def rft_rows(n: int = 8) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Answer with the number only."},
                          {"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)}
            for i in range(n)]


def upload(client, name: str, rows: list[dict]):
    return client.files.create(file=(name, "".join(json.dumps(r) + "\n" for r in rows)), purpose="fine-tune")


def test_a_reinforcement_job_with_a_multi_grader(server, client):
    training_file = upload(client, "sums.jsonl", rft_rows())
    assert training_file.status == "processed"
    flaky = {"type": "python", "name": "strict",
             "source": "def grade(sample, item):\n    if item['answer'] == '6':\n        raise ValueError('no six')\n"
                       "    return 1.0 if sample['output_text'].strip() == item['answer'] else 0.0\n"}
    grader = {**MULTI, "graders": {"exact": EXACT, "digits": CODE, "strict": flaky},
              "calculate_output": "0.5 * exact + 0.25 * digits + 0.25 * strict"}
    job = client.fine_tuning.jobs.create(
        training_file=training_file.id, model="tunery/tiny", suffix="sums", seed=3,
        method={"type": "reinforcement", "reinforcement": {
            "grader": grader,
            "hyperparameters": {"n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.5,
                                "reasoning_effort": "low", "learning_rate_multiplier": 10}}})
    assert job.status == "queued" and job.method.type == "reinforcement"
    hyper = job.method.reinforcement.hyperparameters
    assert (hyper.n_epochs, hyper.batch_size, hyper.compute_multiplier) == (1, 2, 0.5)
    assert job.method.reinforcement.grader.name == "answer"
    training = server.store.load_training(job.id.removeprefix("ftjob-"))
    assert training.input["method"] == "grpo" and training.input["num_generations"] == 4
    assert training.input["max_completion_length"] == 256 and training.input["micro_batch_size"] == 8

    deadline = time.monotonic() + 600
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job.status
        time.sleep(0.5)
    assert job.status == "succeeded", f"{job.error}\n{training.logs}"
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    steps = [e for e in events if e.type == "metrics"]
    assert sorted(e.data["step"] for e in steps) == [1, 2, 3, 4]
    for e in steps:
        assert 0.0 <= e.data["train_reward_mean"] <= 1.0 and e.data["train_reward_std"] >= 0
        assert 0.0 <= e.data["train_frac_reward_zero_std"] <= 1.0 and e.data["train_mean_completion_length"] >= 1
        assert {"train_grader_exact", "train_grader_digits", "train_grader_strict"} <= set(e.data)
        assert "reward=" in e.message
    warnings = [e for e in events if e.level == "warn"]
    assert any("scored 0: grader.graders.strict: python grader ValueError: no six" in e.message for e in warnings), \
        [e.message for e in events]

    [result_id] = job.result_files
    table = list(csv.DictReader(io.StringIO(client.files.content(result_id).text)))
    assert [int(r["step"]) for r in table] == [1, 2, 3, 4]
    assert {"train_reward_mean", "train_frac_reward_zero_std", "train_grader_strict"} <= set(table[0])
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints[0].step_number == 4 and checkpoints[0].metrics.model_extra["train_reward_mean"] is not None

    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4, temperature=0,
                                           messages=rft_rows(1)[0]["messages"])
    assert reply.model == job.fine_tuned_model and 1 <= reply.usage.completion_tokens <= 4


@pytest.mark.parametrize("grader, param, words", [
    ({"type": "nope", "name": "x"}, "method.reinforcement.grader.type", "unknown grader type 'nope'"),
    ({**CODE, "source": "def grade(sample, item):\n    return (\n"}, "method.reinforcement.grader.source",
     "does not compile"),
])
def test_a_bad_grader_is_refused_before_a_job_exists(server, client, grader, param, words):
    training_file = upload(client, "sums.jsonl", rft_rows(4))
    before = len(client.fine_tuning.jobs.list(limit=100).data)
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.create(training_file=training_file.id, model="tunery/tiny",
                                       method={"type": "reinforcement", "reinforcement": {"grader": grader}})
    assert exc.value.body["param"] == param and words in exc.value.body["message"], exc.value.body
    assert len(client.fine_tuning.jobs.list(limit=100).data) == before


def test_rows_without_what_the_grader_reads_are_refused_by_line(server, client):
    rows = rft_rows(3)
    del rows[1]["answer"]
    training_file = upload(client, "sums.jsonl", rows)
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.create(training_file=training_file.id, model="tunery/tiny",
                                       method={"type": "reinforcement", "reinforcement": {"grader": EXACT}})
    body = exc.value.body
    assert body["param"] == "training_file" and body["code"] == "invalid_training_file"
    assert ":2: grader.reference reads {{ item.answer }}, but item has no field 'answer'" in body["message"]
    sft = upload(client, "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}]}] * 3)
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.create(training_file=sft.id, model="tunery/tiny",
                                       method={"type": "reinforcement", "reinforcement": {"grader": EXACT}})
    assert "method=grpo trains on prompts" in exc.value.body["message"]
