"""Vector shards: rows read back as written, compaction, crash leftovers swept, any fsspec path, and the
migration that moves a catalogue's embeddings out of its database."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from sqlalchemy import inspect, text
from tests.catalogues import catalogue_for, edited, stored_rows, tiles, write_catalogue

from indexer import crud
from indexer import vectors as shards
from indexer.db import create_db_engine, current_revision, downgrade, upgrade
from indexer.vectors import VectorStore


def _rows(n: int, dim: int = 8, seed: int = 0) -> tuple[list[int], np.ndarray, list[bytes]]:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(10, 10 + 3 * n, 3)).tolist()  # unsorted, with gaps
    return ids, rng.normal(size=(n, dim)).astype(np.float16), [f"description {i}".encode() * 3 for i in ids]


def test_rows_read_back_as_written_by_id_reading_only_their_row_groups(tmp_path):
    store = VectorStore(tmp_path / "vectors")
    ids, vectors, descriptions = _rows(300)
    name = store.write(ids, vectors, descriptions, tag=7)
    assert name.startswith("000000000007-") and shards.rows_in(name) == 300 and store.names() == [name]
    wanted = [ids[5], ids[200], 999_999]  # the last is not in the shard
    rows = store.read(name, wanted)
    assert rows.ids.tolist() == sorted(wanted[:2])
    for item_id, vector, description in zip(rows.ids.tolist(), rows.embeddings, rows.descriptions):
        n = ids.index(item_id)
        assert np.array_equal(vector, vectors[n]) and description == descriptions[n]
    opened = store._file(name)
    groups = -(-300 // shards.ROW_GROUP)
    assert opened.file.metadata.num_row_groups == groups  # ROW_GROUP rows each, sorted by id
    ordered = sorted(ids)
    assert opened.row_groups(np.array([ordered[0]])) == [0]
    assert opened.row_groups(np.array([ordered[-1]])) == [groups - 1]
    assert opened.row_groups(np.array([ordered[0], ordered[shards.ROW_GROUP], 999_999])) == [0, 1]
    assert opened.row_groups(np.array([ordered[0] - 1])) == []  # below every id: in no group
    assert len(store.read(name).ids) == 300 and store.read(name, []).ids.tolist() == []
    assert not [p for p in (tmp_path / "vectors").iterdir() if p.suffix != ".parquet"]  # no temporary file left


def test_threads_read_one_shard_at_once(tmp_path):
    """The API searches from several threads: reads of one open shard must not interleave their seeks."""
    from concurrent.futures import ThreadPoolExecutor

    store = VectorStore(tmp_path / "vectors")
    ids, vectors, _ = _rows(1000)
    descriptions = [bytes([i % 256]) * 7000 for i in ids]  # description-sized rows: reads long enough to overlap
    name = store.write(ids, vectors, descriptions, tag=1)
    picks = [np.random.default_rng(n).choice(ids, 20, replace=False) for n in range(400)]
    with ThreadPoolExecutor(8) as pool:
        for pick, rows in zip(picks, pool.map(lambda chosen: store.read(name, chosen), picks)):
            assert rows.ids.tolist() == sorted(pick.tolist())
            assert [d for d in rows.descriptions] == [descriptions[ids.index(i)] for i in rows.ids.tolist()]


def test_compaction_plan_merges_small_shards_and_rewrites_mostly_dead_ones():
    big = f"000000000001-a-{2 * shards.COMPACT_BELOW}.parquet"
    assert shards.compaction_plan({big: 2 * shards.COMPACT_BELOW}) == []
    assert shards.compaction_plan({big: shards.COMPACT_BELOW - 1}) == [big]  # mostly dead
    assert shards.compaction_plan({"000000000002-b-10.parquet": 10}) == []  # a single small shard stays
    assert shards.compaction_plan({"000000000002-b-10.parquet": 10, "000000000003-c-4.parquet": 4, big: 2 * shards.COMPACT_BELOW}) \
        == ["000000000002-b-10.parquet", "000000000003-c-4.parquet"]


def test_a_reader_whose_shard_was_compacted_away_resolves_again(tmp_path):
    store = VectorStore(tmp_path / "vectors")
    ids, vectors, descriptions = _rows(6)
    old = store.write(ids[:3], vectors[:3], descriptions[:3], tag=1)
    other = store.write(ids[3:], vectors[3:], descriptions[3:], tag=1)
    new = store.write(ids, vectors, descriptions, tag=2)
    store.delete([old])
    mappings = iter([[(other, ids[3:]), (old, ids[:3])], [(new, ids)]])  # the second resolution: after the compaction
    read = list(store._resolved(lambda: iter(next(mappings))))
    assert sorted(i for rows in read for i in rows.ids.tolist()) == sorted(ids)  # each once


def test_index_runs_compact_their_shards_and_sweep_what_killed_runs_left(tmp_path, tiny_model):
    root = tmp_path / "photos"
    paths = write_catalogue(root, 7)
    catalogue = catalogue_for(tmp_path, tiny_model, batch_size=2)
    report = catalogue.index(root)
    store = catalogue.db.vectors
    assert report.shards_compacted == 4 and len(store.names()) == 1  # four batches' shards merged into one
    first = stored_rows(catalogue)
    assert sorted(first) == sorted(map(str, paths))

    (store.fs.makedirs(store.root, exist_ok=True), store.fs.pipe(f"{store.root}/000000000099-dead-3.parquet", b"half"))
    paths[0].unlink()
    tiles()[20].save(paths[1], quality=90)
    again = catalogue.index(root)
    assert again.shards_swept == 1 and (again.removed, again.updated) == (1, 1)
    assert len(store.names()) == 1  # the changed item's new shard merged with the old one, whose dead rows are gone
    live = crud.live_rows(catalogue.db.sessionmaker())
    assert list(live.values()) == [6] and shards.rows_in(store.names()[0]) == 6
    second = stored_rows(catalogue)
    assert sorted(second) == sorted(map(str, paths[1:]))
    assert not np.array_equal(second[str(paths[1])][0], first[str(paths[1])][0])
    for path in paths[2:]:
        assert np.array_equal(second[str(path)][0], first[str(path)][0]) and second[str(path)][1] == first[str(path)][1]


def test_shards_on_any_fsspec_path(tmp_path, tiny_model):
    """The vector store need not be in the data directory, nor on a local disk: here fsspec's in-memory file system."""
    root = tmp_path / "photos"
    paths = write_catalogue(root, 5)
    url = f"memory://whymatch-test-{tmp_path.name}/vectors"
    catalogue = catalogue_for(tmp_path, tiny_model, vectors_url=url)
    catalogue.index(root)
    assert not (tmp_path / "data" / "vectors").exists() and len(catalogue.db.vectors.names()) == 1
    query = tmp_path / "query.jpg"
    edited(tiles()[3]).save(query)
    assert catalogue.search(query, k=1, candidates=5).matches[0].source == str(paths[3])


def test_the_migration_moves_embeddings_out_of_the_database_and_back(tmp_path, tiny_model, database_url):
    """A catalogue at revision 0004 (embeddings and descriptions in the items table) upgraded: every row moves
    into shards and search is unchanged; an item indexed before descriptions were stored loses its
    embedding, and the next index run embeds it again. Downgrading moves the rows back."""
    root = tmp_path / "photos"
    paths = write_catalogue(root, 6)
    catalogue = catalogue_for(tmp_path, tiny_model, database_url)
    catalogue.index(root)
    query = tmp_path / "query.jpg"
    edited(tiles()[2]).save(query)
    before = [(m.source, m.head_score) for m in catalogue.search(query, k=3, candidates=6).matches]
    rows = stored_rows(catalogue)
    store, engine = catalogue.db.vectors, create_db_engine(catalogue.database_url)
    catalogue.db.dispose()

    assert downgrade(engine, "0004", vectors=store) == "0004"
    assert {"embedding", "descriptors"} <= {c["name"] for c in inspect(engine).get_columns("items")}
    with engine.begin() as connection:
        stored = dict(connection.execute(text("SELECT source, embedding FROM items")).all())
        assert all(np.allclose(np.frombuffer(stored[s], "<f4"), rows[s][0]) for s in rows)
        connection.execute(text("UPDATE items SET descriptors = NULL WHERE source = :s"), {"s": str(paths[4])})
    shutil.rmtree(tmp_path / "data" / "vectors")
    with pytest.raises(RuntimeError, match="needs the vector store"):
        upgrade(engine)
    assert current_revision(engine) == "0004"  # the failed upgrade left nothing behind

    assert upgrade(engine, vectors=store) == "0005"
    engine.dispose()
    moved = catalogue_for(tmp_path, tiny_model, database_url)
    assert sorted(stored_rows(moved)) == sorted(str(p) for p in paths if p != paths[4])
    report = moved.index(root)
    assert (report.updated, report.embedded, report.unchanged) == (1, 1, 5)
    after = [(m.source, m.head_score) for m in moved.search(query, k=3, candidates=6).matches]
    assert [s for s, _ in after] == [s for s, _ in before]
    assert [h for _, h in after] == pytest.approx([h for _, h in before], abs=1e-3)
