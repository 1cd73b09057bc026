"""Creating trainings: everything is checked before queueing, and a bad request of any kind
gets its documented status and leaves no row (and no download) behind. No worker runs here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_api_models import assert_problem
from test_api_support import LiveServer, StaticFiles
from tunery.artifacts import TrainingJob as Job
from tunery.store.models import Version
from tunery.store.store import base_version_id

BASE = f"/v1/models/tunery/smollm2-135m/versions/{base_version_id('smollm2-135m')}/trainings"
MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(
        tmp_path_factory.mktemp("api-trainings"), allow_local_paths=True, max_upload_bytes=MAX_BYTES
    )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def alice(server):
    with server.client("alice") as client:
        client.post(
            "/v1/models", json={"owner": "alice", "name": "dest", "visibility": "private", "hardware": "cpu"}
        ).raise_for_status()
        yield client


@pytest.fixture(scope="module")
def bob(server):
    with server.client("bob") as client:
        client.post(
            "/v1/models", json={"owner": "bob", "name": "dest", "visibility": "private", "hardware": "cpu"}
        ).raise_for_status()
        yield client


@pytest.fixture(scope="module")
def web(tmp_path_factory, qa_rows_module):
    folder = tmp_path_factory.mktemp("web")
    (folder / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows_module))
    (folder / "huge.jsonl").write_text(json.dumps({"text": "x" * (2 * MAX_BYTES)}) + "\n")
    static = StaticFiles(folder)
    yield static
    static.stop()


@pytest.fixture(scope="module")
def qa_rows_module():
    return [{"prompt": f"Item {i}:", "completion": f" {i % 3}"} for i in range(24)]


@pytest.fixture(scope="module")
def good_file(alice, qa_rows_module):
    data = "".join(json.dumps(r) + "\n" for r in qa_rows_module).encode()
    return alice.post("/v1/files", files={"content": ("good.jsonl", data, "application/jsonl")}).json()


def upload(client, name: str, lines: list[str]) -> dict:
    data = "".join(line + "\n" for line in lines).encode()
    response = client.post("/v1/files", files={"content": (name, data, "application/jsonl")})
    assert response.status_code == 201, response.text
    return response.json()


def create(client, input: dict, destination: str | None = "alice/dest", path: str = BASE, **extra):
    body = {"input": input, **extra}
    if destination is not None:
        body["destination"] = destination
    return client.post(path, json=body)


@pytest.fixture
def nothing_left(server):
    """Asserts that the test left no training, version or prediction row and no download behind
    (the server itself never creates file rows for a training)."""
    before = server.counts()
    downloads = server.settings.download_dir
    listed = set(downloads.iterdir()) if downloads.exists() else set()
    yield
    after = server.counts()
    assert {k: after[k] for k in KINDS} == {k: before[k] for k in KINDS}
    assert (set(downloads.iterdir()) if downloads.exists() else set()) == listed


KINDS = ("Training", "Version", "Prediction")
GOOD = {"num_validation_samples": 4, "max_steps": 2}


@pytest.mark.parametrize(
    ("input", "fields"),
    [
        ({"bogus": 1}, {"bogus"}),
        ({"num_train_epochs": "many"}, {"num_train_epochs"}),
        ({"learning_rate": 5}, {"learning_rate"}),
        (
            {"lora_dropout": -0.1, "chunk_size": 4, "peft_method": "dora"},
            {"lora_dropout", "chunk_size", "peft_method"},
        ),
        ({"micro_batch_size": 3}, {"micro_batch_size"}),
        ({"wrap_packed_sequences": True}, {"wrap_packed_sequences"}),
        (  # errors of single fields and across fields, in one answer
            {"seed": "x", "micro_batch_size": 3, "wrap_packed_sequences": True},
            {"seed", "micro_batch_size", "wrap_packed_sequences"},
        ),
    ],
)
def test_bad_inputs_are_422_listing_every_field(server, alice, good_file, nothing_left, input, fields):
    body = assert_problem(create(alice, {"train_data": good_file["urls"]["get"]} | input), 422)
    assert {e["field"] for e in body["errors"]} == fields
    for field in fields:
        assert field in body["detail"]


def test_missing_train_data(server, alice, nothing_left):
    body = assert_problem(create(alice, {"num_train_epochs": 1}), 422)
    assert body["errors"][0]["field"] == "train_data"


@pytest.mark.parametrize(
    ("destination", "status"),
    [
        (None, 422),
        ("nope", 422),
        ("alice/", 422),
        ("alice/missing", 404),
        ("bob/dest", 404),
        ("tunery/smollm2-135m", 404),
    ],
)
def test_destination_must_be_an_existing_model_of_the_caller(
    server, alice, bob, good_file, nothing_left, destination, status
):
    body = assert_problem(
        create(alice, {"train_data": good_file["urls"]["get"]}, destination=destination), status
    )
    assert "destination" in body["detail"] or any(e["field"] == "destination" for e in body.get("errors", []))


def test_unknown_or_foreign_version_is_404(server, alice, bob, good_file, nothing_left):
    url = good_file["urls"]["get"]
    assert_problem(
        create(alice, {"train_data": url}, path=BASE.replace(base_version_id("smollm2-135m"), "0" * 64)), 404
    )
    assert_problem(create(alice, {"train_data": url}, path="/v1/models/bob/dest/versions/abc/trainings"), 404)


def test_a_trained_version_is_not_a_base(server, alice, good_file):
    model = server.store.get_model("alice", "alice", "dest")
    with server.store.session() as s:
        s.add(Version(id="f" * 64, model_id=model.id, base_name="smollm2-135m", run_url="/nowhere"))
    before = server.counts()
    body = assert_problem(
        create(
            alice,
            {"train_data": good_file["urls"]["get"]},
            path=f"/v1/models/alice/dest/versions/{'f' * 64}/trainings",
        ),
        422,
    )
    assert "base" in body["detail"]
    assert server.counts() == before


def test_bad_lines_are_422_with_every_line_error(server, alice, nothing_left):
    bad = upload(
        alice,
        "bad.jsonl",
        [
            '{"prompt": "a", "completion": "b"}',
            '{"prompt": "a"}',
            "not json",
            '{"prompt": "c", "completion": "d"}',
            '{"prompt": 1, "completion": "e"}',
        ],
    )
    body = assert_problem(create(alice, {"train_data": bad["urls"]["get"]}), 422)
    assert [e["line"] for e in body["errors"]] == [2, 3, 5]
    assert all(e["file"] == "bad.jsonl" and e["reason"] for e in body["errors"])
    assert "bad.jsonl:2" in body["detail"]


def test_bad_validation_data_names_its_file(server, alice, good_file, nothing_left):
    bad = upload(alice, "val.jsonl", ['{"text": "only text"}'])
    body = assert_problem(
        create(alice, {"train_data": good_file["urls"]["get"], "validation_data": bad["urls"]["get"]}), 422
    )
    assert "same format" in body["detail"] and "val.jsonl" in body["detail"]
    assert body["errors"][0]["field"] == "validation_data"
    bad = upload(alice, "val2.jsonl", ['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'])
    body = assert_problem(
        create(alice, {"train_data": good_file["urls"]["get"], "validation_data": bad["urls"]["get"]}), 422
    )
    assert [(e["file"], e["line"]) for e in body["errors"]] == [("val2.jsonl", 2)]


def test_too_few_rows(server, alice, nothing_left):
    small = upload(alice, "small.jsonl", ['{"text": "a"}', '{"text": "b"}', '{"text": "c"}'])
    body = assert_problem(create(alice, {"train_data": small["urls"]["get"]}), 422)
    assert "num_validation_samples" in body["detail"]
    assert body["errors"][0]["field"] == "num_validation_samples"


def test_local_paths_only_when_the_server_allows_them(server, alice, tmp_path, qa_rows_module, nothing_left):
    path = tmp_path / "local.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in qa_rows_module))
    server.settings.allow_local_paths = False
    try:
        body = assert_problem(create(alice, {"train_data": str(path)}), 422)
        assert "local paths are not allowed" in body["detail"]
        assert_problem(create(alice, {"train_data": path.as_uri()}), 422)
    finally:
        server.settings.allow_local_paths = True
    assert_problem(create(alice, {"train_data": str(tmp_path / "missing.jsonl")}), 422)


def test_bad_urls(server, alice, bob, web, nothing_left):
    body = assert_problem(create(alice, {"train_data": web.url + "/missing.jsonl"}), 422)
    assert "404" in body["detail"]
    body = assert_problem(create(alice, {"train_data": web.url + "/huge.jsonl"}), 422)
    assert "larger than" in body["detail"]
    assert_problem(create(alice, {"train_data": "ftp://example.com/x.jsonl"}), 422)
    theirs = upload(bob, "theirs.jsonl", ['{"text": "a"}'])
    body = assert_problem(create(alice, {"train_data": theirs["urls"]["get"]}), 422)
    assert theirs["id"] in body["detail"]


def test_webhook_must_be_http(server, alice, good_file, nothing_left):
    assert_problem(create(alice, {"train_data": good_file["urls"]["get"]}, webhook="file:///etc/passwd"), 422)
    assert_problem(
        create(
            alice,
            {"train_data": good_file["urls"]["get"]},
            webhook="https://example.com/h",
            webhook_events_filter=["finished"],
        ),
        422,
    )


def test_create_from_an_uploaded_file(server, alice, good_file):
    for url in (good_file["urls"]["get"], good_file["urls"]["download"]):
        response = create(
            alice,
            {"train_data": url, **GOOD},
            webhook="https://example.com/hook",
            webhook_events_filter=["completed"],
        )
        assert response.status_code == 201, response.text
        training = response.json()
        assert training["status"] == "starting"
        assert training["model"] == "tunery/smollm2-135m"
        assert training["version"] == base_version_id("smollm2-135m")
        assert training["destination"] == "alice/dest"
        assert training["input"] == {"train_data": url, **GOOD}
        assert training["output"] is None and training["error"] is None
        assert training["urls"]["get"] == f"{server.url}/v1/trainings/{training['id']}"
        assert training["urls"]["cancel"].endswith("/cancel")
        row = server.store.load_training(training["id"])
        job = Job.of(row.input, row.job)
        assert job.base == "smollm2-135m"
        assert job.data == {"train_data": server.store.get_file("alice", good_file["id"]).path}
        assert job.given() == {"train_data": url, **GOOD}  # the inputs as given: no defaults filled in
        inputs = job.training_inputs()  # what the worker trains with
        assert inputs.train_data == job.data["train_data"] and inputs.max_steps == 2 and inputs.num_train_epochs == 3


def test_create_from_a_url_and_a_local_path(server, alice, web, tmp_path, qa_rows_module):
    url = web.url + "/good.jsonl"
    first, second = (
        server.store.load_training(create(alice, {"train_data": url, **GOOD}).json()["id"]).job["data"]
        for _ in range(2)
    )
    assert first["train_data"].startswith(f"{server.settings.storage}/data/")  # where any worker reads it
    assert first["train_data"] != second["train_data"]  # each training has its own copy
    # A later request for the same URL that fails removes only its own download.
    assert_problem(create(alice, {"train_data": url, "validation_data": web.url + "/huge.jsonl"}), 422)
    assert Path(first["train_data"]).is_file() and Path(second["train_data"]).is_file()
    downloads = server.settings.download_dir
    assert not downloads.exists() or not [p for p in downloads.iterdir() if p.is_dir()]  # nothing left behind
    path = tmp_path / "local.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in qa_rows_module))
    training = create(alice, {"train_data": str(path), **GOOD}).json()
    assert server.store.load_training(training["id"]).job["data"]["train_data"] == str(path)


def test_list_get_cancel_and_tenancy(server, alice, bob, good_file):
    ids = [create(alice, {"train_data": good_file["urls"]["get"], **GOOD}).json()["id"] for _ in range(3)]
    seen, url = [], "/v1/trainings?limit=2"
    while url:
        page = alice.get(url).json()
        seen += [t["id"] for t in page["results"]]
        url = page["next"]
    assert set(ids) <= set(seen) and len(seen) == len(set(seen))
    assert bob.get("/v1/trainings").json()["results"] == []

    tid = ids[0]
    assert alice.get(f"/v1/trainings/{tid}").json()["status"] == "starting"
    for method, path in [
        ("GET", f"/v1/trainings/{tid}"),
        ("POST", f"/v1/trainings/{tid}/cancel"),
        ("GET", f"/v1/trainings/{tid}/weights"),
    ]:
        assert_problem(bob.request(method, path), 404)
    assert alice.post(f"/v1/trainings/{tid}/cancel").json()["status"] == "canceled"
    again = alice.post(f"/v1/trainings/{tid}/cancel").json()
    assert again["status"] == "canceled" and again["completed_at"]
    assert_problem(alice.get(f"/v1/trainings/{tid}/weights"), 404)
    assert_problem(alice.get("/v1/trainings/doesnotexist"), 404)


def test_summary_view_of_the_list_is_small_and_keeps_what_a_list_shows(server, alice, good_file):
    from tunery.store.models import Training

    ids = [create(alice, {"train_data": good_file["urls"]["get"], **GOOD}).json()["id"] for _ in range(2)]
    history = [{"step": s, "loss": 2.0 / s, "time": 1000.0 + s} for s in range(1, 501)]
    with server.store.session() as s:
        row = s.get(Training, ids[0])
        row.logs = "step line\n" * 5000
        row.metrics = {"step": 500, "max_steps": 900, "loss": 0.004, "history": history,
                       "samples": [{"step": 100, "output": "x" * 1000}], "data": {"rows": 24},
                       "eval": {"tuned": {"exact_match": 0.9}}}

    full = alice.get(f"/v1/trainings/{ids[0]}").json()
    page = alice.get("/v1/trainings?view=summary&limit=1").json()
    (summary,) = page["results"]
    if summary["id"] != ids[0]:  # newest first: follow the next link, which keeps the view
        assert "view=summary" in page["next"] and "limit=1" in page["next"]
        (summary,) = alice.get(page["next"]).json()["results"]
    assert summary["id"] == ids[0] and "logs" not in summary
    assert summary["metrics"] == {"step": 500, "max_steps": 900, "loss": 0.004, "history": history[-20:],
                                  "eval": {"tuned": {"exact_match": 0.9}}}
    assert {k: v for k, v in summary.items() if k != "metrics"} == {
        k: v for k, v in full.items() if k not in ("metrics", "logs")}
    assert len(json.dumps(summary)) < 3000 < len(json.dumps(full)) // 10

    listed = {t["id"]: t for t in alice.get("/v1/trainings").json()["results"]}
    assert listed[ids[0]] == full  # the default view is the whole object, as on Replicate
    assert_problem(alice.get("/v1/trainings?view=tiny"), 422)


RFT_LINES = [json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)})
             for i in range(8)]
SUM_GRADER = {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
              "reference": "{{ item.answer }}", "operation": "eq"}


def test_a_grpo_training_takes_its_grader_as_an_input(server, alice):
    """Replicate's training input `method: grpo` with the grader (OpenAI's grader JSON) and the GRPO
    knobs as ordinary inputs; queued as given."""
    url = upload(alice, "sums.jsonl", RFT_LINES)["urls"]["get"]
    response = create(alice, {"train_data": url, "method": "grpo", "grader": SUM_GRADER, "num_generations": 4,
                              "max_completion_length": 16, **GOOD})
    assert response.status_code == 201, response.text
    training = response.json()
    assert training["input"]["method"] == "grpo" and training["input"]["grader"] == SUM_GRADER
    alice.post(f"/v1/trainings/{training['id']}/cancel").raise_for_status()


@pytest.mark.parametrize("grader, field, words", [
    ({**SUM_GRADER, "operation": "regex"}, "grader.operation", "'eq', 'ne', 'like' or 'ilike'"),
    ({"type": "python", "name": "p", "source": "def grade(sample, item)\n    return 1\n"}, "grader.source",
     "does not compile"),
])
def test_a_bad_grader_is_422_naming_its_field(server, alice, nothing_left, grader, field, words):
    url = upload(alice, "sums.jsonl", RFT_LINES)["urls"]["get"]
    problem = assert_problem(create(alice, {"train_data": url, "method": "grpo", "grader": grader, **GOOD}), 422)
    assert problem.get("field") == field or field in json.dumps(problem), problem
    assert words in json.dumps(problem)


def test_rows_without_what_the_grader_reads_are_422_by_line(server, alice, nothing_left):
    lines = list(RFT_LINES)
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "What is 1 + 1?"}]})
    url = upload(alice, "sums.jsonl", lines)["urls"]["get"]
    problem = assert_problem(create(alice, {"train_data": url, "method": "grpo", "grader": SUM_GRADER, **GOOD}), 422)
    assert [e["line"] for e in problem["errors"]] == [3], problem
    assert "reads {{ item.answer }}, but item has no field 'answer'" in problem["errors"][0]["reason"]
