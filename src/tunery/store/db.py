"""Engine, sessions and migrations: the parts of the store that depend on the database backend.

SQLite (the embedded default) is opened in WAL mode with a busy timeout and foreign keys on.
Its write transactions start with BEGIN IMMEDIATE, which takes the database's write lock up
front: a transaction that reads a row and then updates it can never fail half-way with
SQLITE_BUSY, and two workers claiming a job are serialized (the second one waits, then sees the
first one's claim). PostgreSQL uses ordinary transactions plus row locks (FOR UPDATE, SKIP LOCKED)
taken by the queries themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same in every tunery process sharing a database.
_PG_MIGRATION_LOCK = 0x74756E657279


def make_engine(url: str) -> Engine:
    """An engine for `url`, configured for many threads and processes sharing one database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)

    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Take over BEGIN from the sqlite3 module (it would not emit one before DDL, and only
        # ever a deferred one), following SQLAlchemy's "pysqlite serializable" recipe.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        immediate = conn.get_execution_options().get("tunery_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def session_factories(engine: Engine) -> tuple[sessionmaker[Session], sessionmaker[Session]]:
    """(read, write) session factories. Rows stay usable after commit (expire_on_commit=False),
    since the store hands them to callers after its session has closed."""
    read = sessionmaker(bind=engine, expire_on_commit=False)
    write = sessionmaker(bind=engine.execution_options(tunery_write=True), expire_on_commit=False)
    return read, write


@contextlib.contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction commits when the block ends and rolls back if it raises."""
    with factory() as session, session.begin():
        yield session


def alembic_config(url: str):
    """An alembic Config that needs no alembic.ini: the scripts are inside this package."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates "%"; a URL-encoded password must survive it.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to `revision`, safely when several processes start at once."""
    from alembic import command

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    # Alembic's cookbook recipe for sharing a connection: env.py runs on it, inside this transaction.
    with _migration_lock(engine), engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialize migrations between processes: an advisory lock on PostgreSQL, a lock file
    beside the database file on SQLite (an in-memory database has only one process)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
        return
    database = engine.url.database or ""
    in_memory = not database or database == ":memory:" or database.startswith("file:")
    if engine.dialect.name != "sqlite" or in_memory:
        yield
        return
    lock_path = Path(database).expanduser().with_name(Path(database).name + ".migrate.lock")
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
