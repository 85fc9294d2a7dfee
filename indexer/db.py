"""Database engines and sessions from a URL, with the schema brought up to date by Alembic on first use.

SQLite (the default: a file in the data directory) and PostgreSQL (``postgresql+psycopg://...``)
are supported. The schema is created only by the migrations in ``migrations/`` at the repository
root; Alembic is configured here in code, so no ``alembic.ini`` is needed.
"""

from __future__ import annotations

import sqlite3
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from indexer.vectors import VectorStore

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# Any constant: serialises concurrent `upgrade` calls on one PostgreSQL database.
_PG_MIGRATION_LOCK = 0x77686D61  # "whma"


def alembic_config() -> Config:
    """An Alembic config pointing at ``migrations/`` (no ini file)."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise RuntimeError(f"whymatch migrations not found at {MIGRATIONS_DIR}: use a checkout of the repository")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have exactly one head, found {heads}")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def create_db_engine(url: str) -> Engine:
    """An engine for ``url``. SQLite: its folder is created, foreign keys enforced, WAL journal."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
            # Python's sqlite3 only opens a transaction before INSERT/UPDATE/DELETE, so DDL (the
            # migrations!) would autocommit statement by statement and a killed upgrade would leave
            # half a schema. Take over: no implicit transactions, an explicit BEGIN below.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            # WAL: readers never block the writer, and a killed writer leaves the last committed state.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection) -> None:  # noqa: ANN001
            connection.exec_driver_sql("BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True)


def upgrade(engine: Engine, revision: str = "head", *, vectors: VectorStore | None = None) -> str | None:
    """Run the migrations up to ``revision`` on ``engine``; returns the revision now current. ``vectors``:
    the catalogue's vector store, for a migration that moves rows into it (needed when there are any)."""
    config = alembic_config()
    config.attributes["vectors"] = vectors
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Held until this transaction ends; two processes starting at once migrate one after the other.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    return current_revision(engine)


def downgrade(engine: Engine, revision: str, *, vectors: VectorStore | None = None) -> str | None:
    config = alembic_config()
    config.attributes["vectors"] = vectors
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
    return current_revision(engine)


def ensure_schema(engine: Engine, vectors: VectorStore | None = None) -> bool:
    """Upgrade to the head revision unless the database is already there (cheap when it is); whether it upgraded."""
    if current_revision(engine) == head_revision():
        return False
    upgrade(engine, vectors=vectors)
    return True


class Database:
    """An engine plus a session factory, and the vector store whose shards the items point at (``vectors``,
    ``indexer.vectors``); the schema is upgraded when the object is made."""

    def __init__(self, url: str, vectors: VectorStore, *, migrate: bool = True) -> None:
        self.url = url
        self.vectors = vectors
        self.engine = create_db_engine(url)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        if migrate and ensure_schema(self.engine, vectors):
            self.reclaim_space()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error."""
        with self.sessionmaker() as session, session.begin():
            yield session

    def reclaim_space(self) -> None:
        """Give the space of removed values back to the file system after a migration (e.g. the embeddings
        moved into vector shards): SQLite keeps freed pages in its file until VACUUM. PostgreSQL's
        autovacuum makes such space reusable by later rows on its own; nothing is done there."""
        if self.dialect != "sqlite":
            return
        connection = self.engine.raw_connection()
        try:
            cursor = connection.cursor()
            cursor.execute("VACUUM")
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            cursor.close()
        except sqlite3.OperationalError as exc:
            # Everything is committed already: a reader holding the file or a full disk only delays the
            # shrink to a later VACUUM (e.g. sqlite3 whymatch.db VACUUM); the run goes on.
            warnings.warn(f"the database keeps its freed space for now: VACUUM failed ({exc})", stacklevel=2)
        finally:
            connection.close()

    def dispose(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({make_url(self.url).render_as_string(hide_password=True)!r})"


_cache: dict[tuple[str, str], Database] = {}
_cache_lock = threading.Lock()


def get_database(url: str, vectors_url: str) -> Database:
    """One ``Database`` per database and vector store per process (migrated on first use)."""
    with _cache_lock:
        db = _cache.get((url, vectors_url))
        if db is None:
            db = _cache[(url, vectors_url)] = Database(url, VectorStore(vectors_url))
        return db
