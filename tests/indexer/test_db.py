"""The catalogue database: schema made by the Alembic migrations only, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from indexer.settings import StorageSettings
from indexer import crud
from indexer.db import Database, MIGRATIONS_DIR, current_revision, downgrade, head_revision, upgrade
from indexer.vectors import VectorStore
from indexer.models import Base, DuplicateGroup, DuplicatePair, DedupRun, Item, MatchReview
from whymatch.cli import main

TABLES = {"items", "catalogue_state", "index_generations", "dedup_runs", "duplicate_groups", "duplicate_pairs",
          "dedup_calibrations", "match_reviews"}


def _item(n: int, **extra) -> Item:
    values = dict(source=f"/photos/{n}.jpg", origin="/photos", listing=f"l{n % 2}", sha256=f"{n:064x}", size_bytes=10,
                  mtime_ns=1, width=4, height=3)
    values.update(extra)
    return Item(**values)


def test_migrations_create_exactly_the_models_schema(database_url, tmp_path):  # noqa: F811
    db = Database(database_url, VectorStore(tmp_path / "vectors"))
    try:
        assert current_revision(db.engine) == head_revision() == "0005"
        assert TABLES <= set(inspect(db.engine).get_table_names())
        with db.engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
        assert differences == []
        with db.session() as session:
            assert crud.catalogue_version(session) == 0
    finally:
        db.dispose()


def test_downgrade_to_base_and_upgrade_again(database_url, tmp_path):  # noqa: F811
    db = Database(database_url, VectorStore(tmp_path / "vectors"))
    try:
        assert downgrade(db.engine, "base") is None
        assert not TABLES & set(inspect(db.engine).get_table_names())
        assert upgrade(db.engine) == "0005"
        Database(database_url, db.vectors).dispose()  # a second "first use" finds the schema current and does nothing
    finally:
        db.dispose()


def test_constraints_and_cascades(database_url, tmp_path):  # noqa: F811
    db = Database(database_url, VectorStore(tmp_path / "vectors"))
    try:
        with db.session() as session:
            a, b, c = _item(1), _item(2), _item(3)
            session.add_all([a, b, c])
            session.flush()
            review = crud.add_review(session, b.id, a.id, "accept", reviewer="ana", note="same sofa")
            assert (review.item_a_id, review.item_b_id) == (a.id, b.id)  # stored in id order
            crud.add_review(session, a.id, b.id, "reject", reviewer="bo")
            run = DedupRun(model_key="m", threshold=0.9, threshold_source="given", k=5)
            session.add(run)
            session.flush()
            group = DuplicateGroup(run_id=run.id, size=2, n_listings=2, max_score=0.99)
            session.add(group)
            session.flush()
            session.add(DuplicatePair(run_id=run.id, group_id=group.id, item_a_id=a.id, item_b_id=c.id,
                                      index_similarity=0.9, head_score=0.99, exact=False))
            ids = (a.id, b.id, c.id)
        with db.session() as session:
            assert crud.latest_reviews(session) == {(ids[0], ids[1]): "reject"}  # the latest decision wins
            assert [r.reviewer for r in crud.reviews_of(session, ids[1], ids[0])] == ["ana", "bo"]
        with pytest.raises(ValueError):
            with db.session() as session:
                crud.add_review(session, ids[0], ids[1], "maybe", reviewer="x")
        with pytest.raises(IntegrityError):  # the CHECK constraint holds even past the Python check
            with db.session() as session:
                session.add(MatchReview(item_a_id=ids[0], item_b_id=ids[1], decision="maybe", reviewer="x"))
        with pytest.raises(IntegrityError):  # unique source
            with db.session() as session:
                session.add(_item(1))
        with db.session() as session:  # deleting an item removes its reviews and pairs (ON DELETE CASCADE)
            assert crud.delete_items(session, [ids[0]]) == 1
        with db.session() as session:
            assert session.scalars(select(MatchReview)).all() == []
            assert session.scalars(select(DuplicatePair)).all() == []
            assert crud.count_items(session) == 2
    finally:
        db.dispose()


def test_sqlite_ids_are_never_reused(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'w.db'}", VectorStore(tmp_path / "vectors"))
    with db.session() as session:
        session.add_all([_item(1), _item(2)])
    with db.session() as session:
        crud.delete_items(session, [2])
    with db.session() as session:
        session.add(_item(3))
        session.flush()
        assert session.scalars(select(Item.id).order_by(Item.id)).all() == [1, 3]
    db.dispose()


def test_settings_default_database_is_sqlite_in_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WHYMATCH_DATABASE_URL", raising=False)
    assert StorageSettings(data_dir=tmp_path).database_url == f"sqlite:///{tmp_path.as_posix()}/whymatch.db"
    monkeypatch.setenv("WHYMATCH_DATABASE_URL", "postgresql+psycopg://u:p@127.0.0.1/w")
    monkeypatch.setenv("WHYMATCH_INDEX_FACTORY", "HNSW32")
    monkeypatch.delenv("WHYMATCH_VECTORS_URL", raising=False)
    assert StorageSettings(data_dir=tmp_path).vectors_url == f"{tmp_path.as_posix()}/vectors"
    settings = StorageSettings(data_dir=tmp_path)
    assert settings.database_url.startswith("postgresql+psycopg://") and settings.index_factory == "HNSW32"


def test_db_upgrade_command(database_url, tmp_path):  # noqa: F811
    env = {"WHYMATCH_DATABASE_URL": database_url, "WHYMATCH_DATA_DIR": str(tmp_path / "data")}
    result = CliRunner().invoke(main, ["db", "upgrade"], env=env)
    assert result.exit_code == 0, result.output
    assert "revision 0005" in result.output
    from sqlalchemy.engine import make_url

    password = make_url(database_url).password
    assert not password or password not in result.output  # never printed
    result = CliRunner().invoke(main, ["db", "current"], env=env)
    assert result.exit_code == 0 and "revision 0005 (newest 0005)" in result.output


def test_migrations_dir_is_found_from_the_package():
    assert (MIGRATIONS_DIR / "env.py").is_file() and (MIGRATIONS_DIR / "versions" / "0001_initial.py").is_file()


def test_a_failed_migration_leaves_no_half_schema(database_url):  # noqa: F811
    """DDL runs in one transaction (SQLite included): an upgrade that dies midway leaves nothing behind."""
    from sqlalchemy import event

    from indexer.db import create_db_engine

    engine = create_db_engine(database_url)

    def fail_midway(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001, ARG001
        if statement.lstrip().upper().startswith("CREATE TABLE INDEX_GENERATIONS"):
            raise RuntimeError("killed midway")

    event.listen(engine, "before_cursor_execute", fail_midway)
    with pytest.raises(RuntimeError, match="killed midway"):
        upgrade(engine)
    event.remove(engine, "before_cursor_execute", fail_midway)
    assert not TABLES & set(inspect(engine).get_table_names())
    assert current_revision(engine) is None
    assert upgrade(engine) == "0005"  # and the next run simply migrates
    engine.dispose()
