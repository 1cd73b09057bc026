"""OpenAI's graders API with the OFFICIAL `openai` client against a live tunery server on loopback:
`client.fine_tuning.alpha.graders.validate` and `.run`, as OpenAI's RFT guide uses them to try a
grader before a job. Bad graders are refused with a 400 naming the field; a python grader runs in
the sandbox, and an attacking one scores 0 with the reason while the server goes on."""

from __future__ import annotations

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
    live = LiveServer(tmp_path_factory.mktemp("openai-graders"))
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
