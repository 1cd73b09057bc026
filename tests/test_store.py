"""The store's catalog on real SQLite files and a real PostgreSQL: tokens, tenants, base models,
pagination, and migrations that build exactly the models' schema."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select

from tunery.server.replicate.shapes import webhook_body
from tunery.store import BadCursor, Conflict, Store, base_version_id
from tunery.store.models import ApiToken, Base, Training


@pytest.fixture
def store(db_url):
    s = Store(db_url, base_url="http://tunery.test", webhook_body=webhook_body)
    yield s
    s.close()


BASES = [("smollm2-135m", "SmolLM2 135M Instruct", "smollm2-135m"),
         ("llama-2-7b", "Llama 2 7B", "meta-llama/Llama-2-7b-hf")]


def _training(store: Store, owner: str, **kw):
    destination = kw.pop("destination", f"{owner}/dest")
    return store.create_training(owner, model="tunery/smollm2-135m",
                                 version_id=base_version_id("smollm2-135m"), destination=destination,
                                 input={"train_data": "x"}, job={"base": "smollm2-135m"}, **kw)


def test_tokens_store_only_a_hash(store):
    token = store.create_token("alice", label="laptop")
    other = store.create_token("alice")
    assert token.startswith("tny_") and len(token) == 44 and token != other
    assert store.authenticate(token).owner == "alice"
    assert store.authenticate(other).owner == "alice"
    assert store.authenticate("tny_" + "x" * 40).refused == "unknown"
    assert store.authenticate("").owner is None
    with store.session() as s:
        rows = list(s.scalars(select(ApiToken)))
    assert {r.token_hash for r in rows} == {hashlib.sha256(t.encode()).hexdigest() for t in (token, other)}
    assert all(token not in (r.token_hash, r.label) for r in rows)


def test_token_scopes_expiry_and_revocation(store):
    from datetime import timedelta

    from sqlalchemy import update

    from tunery.store.models import utcnow

    full = store.create_token("alice")
    reader = store.create_token("alice", "ci", scopes=["predict", "read"], expires_at=utcnow() + timedelta(days=1))
    assert store.authenticate(full).scopes == {"read", "predict", "train", "admin"}
    check = store.authenticate(reader)
    assert (check.owner, check.scopes, check.refused) == ("alice", {"read", "predict"}, None)
    for bad in ({"scopes": ["read", "root"]}, {"scopes": []}, {"expires_at": utcnow() - timedelta(seconds=1)}):
        with pytest.raises(ValueError):
            store.create_token("alice", **bad)

    rows = store.list_tokens("alice")
    assert [(r.prefix, r.scopes, r.label) for r in rows] == [(full[:10], "read,predict,train,admin", None),
                                                               (reader[:10], "read,predict", "ci")]
    assert store.list_tokens("bob") == [] and len(store.list_tokens()) == 2

    with store.session() as s:  # the day passes
        s.execute(update(ApiToken).where(ApiToken.id == rows[1].id).values(expires_at=utcnow() - timedelta(seconds=1)))
    check = store.authenticate(reader)
    assert check.owner is None and check.refused.startswith("expired at ")

    assert store.revoke_token(rows[0].id, owner="bob") is None  # not bob's
    revoked = store.revoke_token(rows[0].id)
    assert revoked.revoked_at is not None and store.revoke_token(rows[0].id).revoked_at == revoked.revoked_at
    assert store.authenticate(full).refused.startswith("revoked at ")
    assert store.revoke_token(10_000) is None


def test_owners_see_only_their_own_things(store):
    store.ensure_base_models(BASES)
    store.create_model("alice", "secret")
    store.create_model("alice", "shared", visibility="public")
    training = _training(store, "alice")
    file = store.create_file("alice", name="d.jsonl", content_type="application/jsonl", size=3,
                             sha256="a" * 64, md5="b" * 32, path="/tmp/d.jsonl")
    prediction = store.create_prediction("alice", model="tunery/smollm2-135m",
                                         version_id=base_version_id("smollm2-135m"), input={"prompt": "hi"})

    assert store.get_training("bob", training.id) is None
    assert store.cancel_training("bob", training.id) is None
    assert store.get_file("bob", file.id) is None
    assert store.delete_file("bob", file.id) is False
    assert store.get_prediction("bob", prediction.id) is None
    assert store.cancel_prediction("bob", prediction.id) is None
    assert store.get_model("bob", "alice", "secret") is None
    assert store.get_model("bob", "alice", "shared").name == "shared"
    assert store.list_trainings("bob").items == [] and store.list_files("bob").items == []
    assert store.list_predictions("bob").items == []
    names = {(m.owner, m.name) for m in store.list_models("bob").items}
    assert names == {("tunery", "smollm2-135m"), ("tunery", "llama-2-7b"), ("alice", "shared")}

    # The owner sees all of it, and the rows survive a cancel attempt by someone else.
    assert store.get_training("alice", training.id).status == "starting"
    assert store.get_file("alice", file.id).path == "/tmp/d.jsonl"
    assert store.get_prediction("alice", prediction.id).status == "starting"
    assert store.get_model("alice", "alice", "secret").visibility == "private"
    assert len(store.list_models("alice").items) == 4
    assert store.delete_file("alice", file.id) is True and store.get_file("alice", file.id) is None


def test_versions_are_found_only_through_visible_models(store):
    store.ensure_base_models(BASES)
    secret = store.create_model("alice", "secret")
    training = _training(store, "alice", destination="alice/secret")
    store.claim_training("w", 30)
    _, version = store.succeed_training(training.id, "w", run_url="/runs/x", weights_url="u", metrics={})

    assert store.find_version("bob", version.id) is None
    model, found = store.find_version("alice", version.id)
    assert (model.name, found.id, found.base_name) == ("secret", version.id, "smollm2-135m")
    assert found.training_id == training.id
    assert store.get_version(secret.id, version.id).run_url == "/runs/x"
    assert store.get_version(secret.id, base_version_id("smollm2-135m")) is None
    base_model, base_version = store.find_version("bob", base_version_id("llama-2-7b"))
    assert (base_model.owner, base_model.is_base) == ("tunery", True)
    assert base_version.base_name == "meta-llama/Llama-2-7b-hf"
    assert store.latest_version(secret.id).id == version.id


def test_create_model_conflicts(store):
    store.create_model("alice", "m", description="first")
    with pytest.raises(Conflict):
        store.create_model("alice", "m")
    store.create_model("bob", "m")  # the same name under another owner is another model
    assert store.get_model("alice", "alice", "m").description == "first"


def test_base_models_are_idempotent_with_stable_ids(store, db_url):
    store.ensure_base_models(BASES)
    store.ensure_base_models(BASES)
    restarted = Store(db_url, base_url="http://tunery.test", webhook_body=webhook_body)  # a second process starting on the same database
    restarted.ensure_base_models(BASES)
    restarted.close()

    for name, description, base_name in BASES:
        model = store.get_model("anyone", "tunery", name)
        assert (model.is_base, model.visibility, model.description) == (True, "public", description)
        versions = store.list_versions(model.id).items
        assert [v.id for v in versions] == [hashlib.sha256(f"tunery-base:{name}".encode()).hexdigest()]
        assert versions[0].base_name == base_name and versions[0].run_url is None
    assert len(store.list_models("anyone").items) == len(BASES)


def test_pagination_walks_every_item_once_newest_first(store):
    ids = [_training(store, "alice").id for _ in range(11)]
    _training(store, "bob")

    seen, pages, cursor = [], [], None
    while True:
        page = store.list_trainings("alice", cursor=cursor, limit=4)
        pages.append(page)
        seen += [t.id for t in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == ids[::-1]
    assert [len(p.items) for p in pages] == [4, 4, 3]
    assert pages[0].previous_cursor is None and pages[1].previous_cursor is not None

    # Going back from the third page gives the second, then the first.
    back = store.list_trainings("alice", cursor=pages[2].previous_cursor, limit=4)
    assert [t.id for t in back.items] == [t.id for t in pages[1].items]
    first = store.list_trainings("alice", cursor=back.previous_cursor, limit=4)
    assert [t.id for t in first.items] == [t.id for t in pages[0].items] and first.previous_cursor is None

    # Rows created meanwhile don't shift later pages.
    newer = _training(store, "alice")
    assert [t.id for t in store.list_trainings("alice", cursor=pages[0].next_cursor, limit=4).items] == \
        [t.id for t in pages[1].items]
    assert store.list_trainings("alice", limit=1).items[0].id == newer.id

    with pytest.raises(BadCursor):
        store.list_trainings("alice", cursor="not-a-cursor")


def test_rows_carry_aware_utc_times(store):
    training = _training(store, "alice")
    again = store.get_training("alice", training.id)
    assert again.created_at == training.created_at
    assert again.created_at.utcoffset().total_seconds() == 0


def test_registered_bases(store):
    store.ensure_base_models(BASES)
    first = store.add_base("mine", "/models/mine", description="ours", registered_by="cli:op")
    assert first.id != base_version_id("mine") and len(first.id) == 64
    model, version = store.find_version("bob", first.id)
    assert (model.owner, model.name, model.is_base, model.visibility) == ("tunery", "mine", True, "public")
    assert (version.base_name, model.registered_by, model.description) == ("/models/mine", "cli:op", "ours")
    assert [m.name for m in store.list_bases().items] == ["mine"]  # the built-in ones are not listed
    assert store.registered_base("smollm2-135m") is None and store.registered_base("mine").id == model.id
    for name in ("mine", "smollm2-135m"):
        with pytest.raises(Conflict):
            store.add_base(name, "/elsewhere", description=None, registered_by="cli:op")

    assert store.remove_base("smollm2-135m") is False  # built in
    assert store.remove_base("mine") is True and store.remove_base("mine") is False
    assert store.find_version("bob", first.id) is None and store.list_bases().items == []
    again = store.add_base("mine", "/models/mine-v2", description=None, registered_by="owner:root")
    assert again.id != first.id  # a new registration is a new version


def test_webhook_secret_is_made_once(store, db_url):
    secret = store.webhook_secret()
    assert secret.startswith("whsec_") and len(secret) == len("whsec_") + 44
    other = Store(db_url, migrate=False)
    assert other.webhook_secret() == secret
    other.close()


def test_migrations_build_the_models_schema(db_url):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from tunery.store import db

    store = Store(db_url)
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []

    # Down to nothing and back up again, as an upgrade of an old installation would run.
    config = db.alembic_config(db_url)
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
    with store.engine.connect() as conn:
        assert Training.__tablename__ not in conn.dialect.get_table_names(conn)
    db.upgrade(store.engine)
    assert store.create_token("alice")
    store.close()
