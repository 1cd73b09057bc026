"""Tokens as operators manage them: scopes, expiry and revocation refused at once on every API in
that API's shape (Replicate's problem, OpenAI's error object through the official client, Azure's
scoring route), the admin routes and the CLI; a token is shown only when it is made."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import openai
import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from test_api_models import assert_problem
from test_api_support import LiveServer
from tunery.store.models import ApiToken, utcnow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("api-tokens"), admin_owners="root")
    yield live
    live.stop()


def call(server, token: str, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {token}"}, **kw)


def openai_client(server, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=token, max_retries=0)


def test_a_revoked_or_expired_token_is_refused_on_every_api_in_its_shape(server):
    store = server.store
    revoked, expired = store.create_token("alice"), store.create_token("alice")
    [row] = [r for r in store.list_tokens("alice") if r.prefix == revoked[:10]]
    for token in (revoked, expired):  # both work first
        assert call(server, token, "GET", "/v1/models").status_code == 200
    store.revoke_token(row.id)
    with store.session() as s:
        s.execute(update(ApiToken).where(ApiToken.prefix == expired[:10])
                  .values(expires_at=utcnow() - timedelta(seconds=1)))
    for token, why in ((revoked, "revoked at"), (expired, "expired at")):
        body = assert_problem(call(server, token, "GET", "/v1/models"), 401)  # Replicate
        assert why in body["detail"] and token not in json.dumps(body)
        azure = call(server, token, "POST", "/v1/models/alice/m/score", json={"input_data": {"input_string": ["x"]}})
        assert why in assert_problem(azure, 401)["detail"]
        with pytest.raises(openai.AuthenticationError) as info:  # OpenAI's shape, through its client
            openai_client(server, token).models.list()
        assert info.value.code == "invalid_api_key" and why in info.value.message


def test_scopes_limit_what_a_token_does(server):
    reader = server.store.create_token("alice", scopes=["read"])
    runner = server.store.create_token("alice", scopes=["read", "predict"])
    assert call(server, reader, "GET", "/v1/trainings").status_code == 200
    body = assert_problem(call(server, reader, "POST", "/v1/predictions", json={"version": "x", "input": {}}), 403)
    assert "'predict' scope" in body["detail"]
    with pytest.raises(openai.PermissionDeniedError) as info:
        openai_client(server, reader).chat.completions.create(model="tunery/smollm2-135m",
                                                               messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "insufficient_scope"
    # `predict` runs models (the request gets past the token to its own checks) but trains nothing.
    assert call(server, runner, "POST", "/v1/predictions", json={"version": "x", "input": {}}).status_code == 422
    created = call(server, runner, "POST", "/v1/models", json={"owner": "alice", "name": "m", "visibility": "private",
                                                                "hardware": "cpu"})
    assert "'train' scope" in assert_problem(created, 403)["detail"]
    with pytest.raises(openai.PermissionDeniedError):
        openai_client(server, runner).files.create(file=("d.jsonl", b"{}\n"), purpose="fine-tune")


def test_operators_list_create_and_revoke_tokens_and_never_see_one_again(server):
    root = server.store.create_token("root")
    made = call(server, root, "POST", "/v1/tokens", json={"owner": "bob", "label": "ci", "scopes": ["read"],
                                                           "expires": "30d"})
    assert made.status_code == 201, made.text
    answer = made.json()
    token = answer["token"]
    assert answer["owner"] == "bob" and answer["scopes"] == ["read"] and answer["status"] == "active"
    assert answer["prefix"] == token[:10] and answer["expires_at"] > answer["created_at"]
    assert call(server, token, "GET", "/v1/models").status_code == 200

    listing = call(server, root, "GET", "/v1/tokens", params={"owner": "bob"})
    assert [t["id"] for t in listing.json()["results"]] == [answer["id"]]
    assert token not in listing.text and "token_hash" not in listing.text

    revoked = call(server, root, "DELETE", f"/v1/tokens/{answer['id']}").json()
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    assert_problem(call(server, token, "GET", "/v1/models"), 401)
    assert_problem(call(server, root, "DELETE", "/v1/tokens/999999"), 404)

    bad = call(server, root, "POST", "/v1/tokens", json={"owner": "bob", "scopes": ["root"], "expires": "soon"})
    assert_problem(bad, 422)
    # Not an operator, or an operator's token without the admin scope.
    assert_problem(call(server, server.store.create_token("alice"), "GET", "/v1/tokens"), 403)
    no_admin = server.store.create_token("root", scopes=["read", "predict", "train"])
    assert "'admin' scope" in assert_problem(call(server, no_admin, "GET", "/v1/tokens"), 403)["detail"]


def test_the_cli_creates_lists_and_revokes(server, monkeypatch):
    from tunery.cli import app

    # The CLI opens the server's database (its settings are read once per process: given here).
    monkeypatch.setattr("tunery.server.cli.get_settings", lambda: server.settings)
    cli = CliRunner()
    made = cli.invoke(app, ["tokens", "create", "--owner", "carol", "--scope", "read", "--scope", "predict",
                            "--expires", "12h", "--label", "laptop"])
    assert made.exit_code == 0, made.output
    token = made.output.strip().splitlines()[-1]
    assert call(server, token, "GET", "/v1/models").status_code == 200
    listed = cli.invoke(app, ["tokens", "list", "--owner", "carol"])
    assert listed.exit_code == 0 and token not in listed.output
    [line] = listed.output.strip().splitlines()
    assert token[:10] in line and "read,predict" in line and "active" in line and "laptop" in line
    token_id = line.split()[0]
    assert cli.invoke(app, ["tokens", "revoke", token_id]).exit_code == 0
    assert "revoked" in cli.invoke(app, ["tokens", "list", "--owner", "carol"]).output
    assert call(server, token, "GET", "/v1/models").status_code == 401
    refused = cli.invoke(app, ["tokens", "create", "--owner", "carol", "--scope", "root"])
    assert refused.exit_code == 2 and "choose from read, predict, train, admin" in refused.output
