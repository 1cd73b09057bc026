"""The one file check (service.files.check_file) from each place that uses it — Replicate's
/v1/files/{id}/check, OpenAI's file upload, and a training's create — with the files in a local
folder and in S3 (moto's server on loopback: TUNERY_TEST_S3_URL), for a good file, a bad one and
one whose bytes are gone from the storage."""

from __future__ import annotations

import json
import os
import secrets

import pytest

from conftest import write_jsonl
from test_api_support import LiveServer

S3 = os.environ.get("TUNERY_TEST_S3_URL")
BASE = "/v1/models/tunery/smollm2-135m/versions"


@pytest.fixture(params=["local", "s3"])
def live(request, tmp_path, monkeypatch):
    overrides = {}
    if request.param == "s3":
        if not S3:
            pytest.skip("needs TUNERY_TEST_S3_URL: run `export TUNERY_TEST_S3_URL=$(scripts/s3.sh start)`; "
                        ".ci/run sets it, so this runs in CI")
        import s3fs

        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(name, "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        bucket = f"tunery-{secrets.token_hex(4)}"
        s3fs.S3FileSystem(endpoint_url=S3).mkdir(bucket)
        overrides = {"storage_url": f"s3://{bucket}/files", "storage_options": {"endpoint_url": S3}}
    server = LiveServer(tmp_path / "home", **overrides)
    yield server, request.param
    server.stop()


def test_good_bad_and_missing_files_everywhere(live, tmp_path, qa_rows):
    server, kind = live
    good = write_jsonl(tmp_path / "good.jsonl", qa_rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps(qa_rows[0]), "{not json", json.dumps({"prompt": "p"}), ""]))
    with server.client("alice") as alice:
        assert alice.post("/v1/models", json={"owner": "alice", "name": "dest"}).status_code == 201
        files = {}
        for path in (good, bad):
            made = alice.post("/v1/files", files={"content": (path.name, path.read_bytes(), "application/jsonl")})
            assert made.status_code == 201, made.text
            files[path.name] = made.json()
        row = server.store.get_file("alice", files["good.jsonl"]["id"])
        assert row.path.startswith("s3://" if kind == "s3" else str(server.settings.home))

        # Replicate's /check (the dashboard's)
        ok = alice.get(f"/v1/files/{files['good.jsonl']['id']}/check").json()
        assert ok["valid"] is True and ok["rows"] == len(qa_rows) and ok["format"] == "prompt_completion"
        wrong = alice.get(f"/v1/files/{files['bad.jsonl']['id']}/check").json()
        assert wrong["valid"] is False and [e["line"] for e in wrong["errors"]] == [2, 3]

        # OpenAI's upload checks at once
        for path, status in ((good, "processed"), (bad, "error")):
            up = alice.post("/openai/v1/files", files={"file": (path.name, path.read_bytes())},
                            data={"purpose": "fine-tune"})
            assert up.status_code == 200 and up.json()["status"] == status, up.text
        assert "line 2" in up.json()["status_details"] and "line 3" in up.json()["status_details"]

        # A training's create
        def train(file):
            return alice.post(f"{BASE}/{server.store.latest_version(server.store.get_model('alice', 'tunery', 'smollm2-135m').id).id}/trainings",
                              json={"destination": "alice/dest", "input": {
                                  "train_data": file["urls"]["get"], "num_validation_samples": 4, "max_steps": 1}})

        created = train(files["good.jsonl"])
        assert created.status_code == 201, created.text
        refused = train(files["bad.jsonl"])
        assert refused.status_code == 422 and [e["line"] for e in refused.json()["errors"]] == [2, 3]

        # Bytes gone from the storage: the check and the training both say so
        server.settings.objects.delete(row.path)
        assert alice.get(f"/v1/files/{row.id}/check").status_code == 404
        gone = train(files["good.jsonl"])
        assert gone.status_code == 422 and "no file" in gone.json()["detail"], gone.text
