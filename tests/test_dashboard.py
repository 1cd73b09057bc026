"""The dashboard's server side: the page and its built assets (shipped, nothing from elsewhere),
and GET /v1/files/{id}/check, the upload-time data check, under the API's auth and tenancy.
(The page itself is driven in a real browser by test_dashboard_browser.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from test_api_support import LiveServer
from tunery.server import dashboard

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("dashboard"))
    yield live
    live.stop()


def upload(client: httpx.Client, lines: list[str], name: str = "data.jsonl") -> dict:
    body = "".join(line + "\n" for line in lines).encode()
    response = client.post("/v1/files", files={"content": (name, body, "application/jsonl")})
    assert response.status_code == 201, response.text
    return response.json()


def test_the_page_and_its_assets_are_served_from_the_package(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    # No CDN: the built page names no other host, and every asset it names is served here.
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text)
    for asset in assets:
        response = httpx.get(server.url + asset)
        assert response.status_code == 200 and response.content, asset
        assert not re.search(rb"https?://(?:cdn|unpkg|fonts\.googleapis)", response.content), asset


def test_the_built_assets_ship_in_the_package():
    static = ROOT / "src/tunery/server/static"
    assert (static / "index.html").is_file(), "build the dashboard: cd web && npm ci && npm run build"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "tunery"
    ]
    for path in static.rglob("*"):
        if path.is_file():
            rel = path.relative_to(ROOT / "src/tunery")
            assert any(rel.match(p) for p in patterns), f"{rel} is not in package-data"


def test_an_unbuilt_dashboard_says_how_to_build_it(tmp_path):
    app = FastAPI()
    dashboard.install(app, static_dir=tmp_path / "static")
    client = TestClient(app)
    response = client.get("/")
    assert response.status_code == 503 and "npm run build" in response.text
    assert client.get("/static/assets/index.js").status_code == 404


def test_check_accepts_a_valid_file(alice):
    f = upload(alice, [json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) for i in range(5)])
    check = alice.get(f"/v1/files/{f['id']}/check").json()
    assert (check["valid"], check["format"], check["rows"], check["errors"]) == (
        True,
        "prompt_completion",
        5,
        [],
    )


def test_check_lists_every_bad_line(alice):
    lines = [
        json.dumps({"prompt": "a", "completion": " b"}),
        '{"prompt": "a", "completion": 3}',
        "not json",
        json.dumps({"text": "another format"}),
    ]
    check = alice.get(f"/v1/files/{upload(alice, lines, 'bad.jsonl')['id']}/check").json()
    assert check["valid"] is False and check["rows"] is None
    assert [(e["file"], e["line"], e["field"]) for e in check["errors"]] == [
        ("bad.jsonl", 2, "completion"),
        ("bad.jsonl", 3, None),
        ("bad.jsonl", 4, None),
    ]
    assert check["errors_total"] == 3 and "3 of 4 lines" in check["detail"]


def test_check_of_an_empty_file(alice):
    check = alice.get(f"/v1/files/{upload(alice, [''])['id']}/check").json()
    assert check["valid"] is False and check["errors"][0]["line"] == 0


def test_check_follows_auth_and_tenancy(server, alice):
    f = upload(alice, [json.dumps({"text": "hi"})])
    assert httpx.get(f"{server.url}/v1/files/{f['id']}/check").status_code == 401
    with server.client("bob") as bob:
        response = bob.get(f"/v1/files/{f['id']}/check")
    assert response.status_code == 404 and response.headers["content-type"] == "application/problem+json"
    assert alice.get("/v1/files/nope/check").status_code == 404
