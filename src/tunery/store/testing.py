"""Throwaway databases for tests: a SQLite file, or a fresh schema in a real PostgreSQL.

The PostgreSQL server comes from `TUNERY_TEST_PG_URL` (start one with `scripts/postgres.sh
start`); every `fresh_database("postgresql")` gets its own schema in it, dropped afterwards,
so tests are independent and may run against one server.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

PG_ENV = "TUNERY_TEST_PG_URL"
PG_SKIP_REASON = (
    f"PostgreSQL tests need {PG_ENV}: run `export {PG_ENV}=$(scripts/postgres.sh start)`. "
    ".ci/run sets it, so these tests do run in CI."
)
BACKENDS = ("sqlite", "postgresql")


def pg_url() -> str | None:
    """The test PostgreSQL server's URL, or None when none was given."""
    return os.environ.get(PG_ENV) or None


@contextlib.contextmanager
def fresh_database(backend: str, directory: Path) -> Iterator[str]:
    """The URL of an empty database of `backend` ("sqlite" or "postgresql"), deleted afterwards.

    SQLite: a new file in `directory`. PostgreSQL: a new schema, made the connection's
    search_path through the URL, so every process given the URL sees the same schema.
    """
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'tunery.db'}"
        return
    if backend != "postgresql":
        raise ValueError(f"unknown backend {backend!r}")
    base = pg_url()
    if base is None:
        raise RuntimeError(PG_SKIP_REASON)

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = "t_" + secrets.token_hex(6)
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            # Sessions of killed workers may still hold locks for a moment; don't wait on them.
            conn.execute(text("SET lock_timeout = '10s'"))
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
