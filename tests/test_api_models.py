"""Auth, error shapes, models and versions, over real HTTP on loopback."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from test_api_support import LiveServer
from tunery.server.replicate.shapes import OUTPUT_SCHEMA
from tunery.spec import TrainingInputs
from tunery.store.store import base_version_id

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("api-models"))
    yield live
    live.stop()


def assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def test_server_does_not_import_torch_to_start():
    # The API must start fast and answer while a worker trains: torch is loaded by a prediction.
    code = "import sys, tunery.server.app, tunery.server.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("header", [None, "Bearer nope", "Token nope", "Bearer", "Basic dXNlcjpwYXNz", ""])
def test_requests_without_a_valid_token_are_401(server, header):
    headers = {"Authorization": header} if header is not None else {}
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/v1/trainings"),
        ("POST", "/v1/predictions"),
        ("GET", "/v1/files"),
        ("GET", "/v1/webhooks/default/secret"),
        ("GET", "/v1/models/tunery/smollm2-135m"),
    ]:
        body = assert_problem(httpx.request(method, server.url + path, headers=headers), 401)
        assert "token" in body["detail"]


@pytest.mark.parametrize("scheme", ["Bearer", "Token", "bearer"])
def test_bearer_and_token_schemes_are_accepted(server, scheme):
    with server.client("carol", scheme=scheme) as client:
        assert client.get("/v1/account").json()["username"] == "carol"


def test_health_needs_no_token(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_unknown_routes_and_methods_are_problems(alice):
    assert_problem(alice.get("/v1/nothing-here"), 404)
    assert_problem(alice.delete("/v1/models"), 405)


def test_validation_errors_are_422_problems_listing_fields(alice):
    body = assert_problem(alice.post("/v1/models", json={"name": 3, "visibility": "secret"}), 422)
    fields = {e["field"] for e in body["errors"]}
    assert {"owner", "name", "visibility"} <= fields
    assert "visibility" in body["detail"]
    assert_problem(
        alice.post("/v1/models", content=b"not json", headers={"content-type": "application/json"}), 422
    )


def test_base_models_are_listed_with_a_stable_version(alice):
    page = alice.get("/v1/models").json()
    names = {f"{m['owner']}/{m['name']}" for m in page["results"]}
    assert "tunery/smollm2-135m" in names
    model = alice.get("/v1/models/tunery/smollm2-135m").json()
    assert model["visibility"] == "public" and isinstance(model["run_count"], int)
    assert model["latest_version"]["id"] == base_version_id("smollm2-135m")


def test_version_schema_describes_inputs_output_and_training_inputs(alice):
    vid = base_version_id("smollm2-135m")
    version = alice.get(f"/v1/models/tunery/smollm2-135m/versions/{vid}").json()
    assert version["id"] == vid and version["cog_version"].startswith("tunery-") and version["created_at"]
    schemas = version["openapi_schema"]["components"]["schemas"]
    assert schemas["Output"] == OUTPUT_SCHEMA
    props = schemas["Input"]["properties"]
    assert {"prompt", "max_new_tokens", "temperature", "top_p", "top_k", "stop_sequences", "seed"} <= set(
        props
    )
    assert set(schemas["TrainingInput"]["properties"]) == set(TrainingInputs.model_fields)
    assert schemas["TrainingInput"]["properties"]["num_train_epochs"]["default"] == 3
    listed = alice.get("/v1/models/tunery/smollm2-135m/versions").json()
    assert [v["id"] for v in listed["results"]] == [vid] and listed["next"] is None
    assert_problem(alice.get("/v1/models/tunery/smollm2-135m/versions/" + "0" * 64), 404)


def test_create_model(alice, bob):
    created = alice.post(
        "/v1/models",
        json={
            "owner": "alice",
            "name": "summarizer",
            "visibility": "private",
            "hardware": "cpu",
            "description": "d",
        },
    )
    assert created.status_code == 201, created.text
    model = created.json()
    assert (model["owner"], model["name"], model["visibility"], model["latest_version"]) == (
        "alice",
        "summarizer",
        "private",
        None,
    )
    assert model["url"].endswith("/v1/models/alice/summarizer")
    assert alice.get("/v1/models/alice/summarizer").json()["description"] == "d"
    again = alice.post(
        "/v1/models",
        json={"owner": "alice", "name": "summarizer", "visibility": "private", "hardware": "cpu"},
    )
    assert_problem(again, 409)
    # Not under someone else's name; and a private model is invisible to others.
    body = assert_problem(
        bob.post(
            "/v1/models", json={"owner": "alice", "name": "x", "visibility": "public", "hardware": "cpu"}
        ),
        422,
    )
    assert body["errors"][0]["field"] == "owner"
    assert_problem(bob.get("/v1/models/alice/summarizer"), 404)
    assert_problem(bob.get("/v1/models/alice/summarizer/versions"), 404)
    assert "alice/summarizer" not in {
        f"{m['owner']}/{m['name']}" for m in bob.get("/v1/models").json()["results"]
    }


def test_model_list_pages_follow_next(server, alice):
    for i in range(5):
        alice.post(
            "/v1/models",
            json={"owner": "alice", "name": f"paged-{i}", "visibility": "private", "hardware": "cpu"},
        ).raise_for_status()
    seen, url = [], "/v1/models?limit=3"
    while url:
        page = alice.get(url).json()
        assert len(page["results"]) <= 3
        seen += [f"{m['owner']}/{m['name']}" for m in page["results"]]
        url = page["next"]
        assert url is None or url.startswith(server.url + "/v1/models?")
    assert len(seen) == len(set(seen))
    assert {f"alice/paged-{i}" for i in range(5)} <= set(seen)
    assert_problem(alice.get("/v1/models?cursor=garbage"), 400)


def test_webhook_secret(alice, bob):
    key = alice.get("/v1/webhooks/default/secret").json()["key"]
    assert key.startswith("whsec_") and bob.get("/v1/webhooks/default/secret").json()["key"] == key
