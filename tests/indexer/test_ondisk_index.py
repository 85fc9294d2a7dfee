"""The out-of-core IVF-PQ index: shards merged into on-disk lists, memory-mapped, re-ranked by exact vectors."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer import faiss_index as fx

N, DIM, FACTORY, NPROBE = 20_000, 64, "IVF64,PQ8", 8


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    """Unit vectors far enough apart that an 8-byte PQ code keeps each one in its own shortlist."""
    faiss.omp_set_num_threads(1)
    x = np.random.default_rng(0).normal(size=(N, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def template(vectors, tmp_path_factory) -> Path:
    """A trained, empty IVF-PQ saved as the shards' template."""
    index = fx.train_ivfpq(vectors[:10_000], "cosine", FACTORY)
    return fx.save_index(index, tmp_path_factory.mktemp("template") / "trained.faiss")


def write_catalogue(files: fx.OnDiskFiles, vectors: np.ndarray, ids: np.ndarray, dtype: type[np.floating] = np.float32) -> None:
    out = fx.create_vectors(files, len(vectors), vectors.shape[1], dtype)
    out[:] = vectors
    out.flush()
    fx.write_ids(files, ids)


def test_merged_shards_search_like_one_index_in_memory(vectors, template, tmp_path):
    files = fx.IndexStore(tmp_path).ondisk("catalogue-000001.faiss")
    write_catalogue(files, vectors, np.arange(N) + 500)
    bounds = [0, 7_000, 13_000, N]
    shards = [fx.add_shard(template, vectors[lo:hi], lo, tmp_path / f"shard-{n}.faiss") for n, (lo, hi) in enumerate(itertools.pairwise(bounds))]
    fx.merge_shards(template, shards, files)
    for shard in shards:
        shard.unlink()  # the merged lists no longer need them

    in_memory = faiss.read_index(str(template))
    in_memory.add_with_ids(vectors, np.arange(N, dtype=np.int64))
    ondisk = fx.load_ondisk(files)
    assert ondisk.ntotal == N and isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(ondisk.index).invlists), faiss.OnDiskInvertedLists)
    params = faiss.SearchParametersIVF(nprobe=NPROBE)
    want_scores, want_rows = in_memory.search(vectors[:50], 20, params=params)
    got_scores, got_rows = ondisk.index.search(vectors[:50], 20, params=params)
    assert np.array_equal(got_rows, want_rows) and np.allclose(got_scores, want_scores)

    scores, ids = ondisk.search(vectors[:50], 5, nprobe=NPROBE)
    assert np.array_equal(ids[:, 0], np.arange(50) + 500) and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    shortlist = in_memory.search(vectors[:50], 5 * fx.RERANK_FACTOR, params=params)[1]
    assert np.array_equal(ids, fx.rerank(vectors, vectors[:50], shortlist, 5, faiss.METRIC_INNER_PRODUCT)[1] + 500)


@pytest.mark.parametrize("metric", [faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2])
def test_rerank_orders_the_shortlist_exactly(vectors, metric):
    rng = np.random.default_rng(1)
    stored = vectors.astype(np.float16)
    queries = vectors[rng.integers(0, N, 8)] + 0.05 * rng.normal(size=(8, DIM)).astype(np.float32)
    rows = rng.integers(0, N, (8, 40))
    rows[:, -3:] = -1  # a shortlist shorter than asked for
    scores, top = fx.rerank(stored, queries, rows, 10, metric)
    for q in range(8):
        candidates = rows[q][rows[q] >= 0]
        exact = stored[candidates].astype(np.float32)
        similarity = exact @ queries[q] if metric == faiss.METRIC_INNER_PRODUCT else -np.linalg.norm(exact - queries[q], axis=1)
        order = np.argsort(-similarity, kind="stable")[:10]
        assert np.array_equal(top[q], candidates[order]) and np.allclose(scores[q], similarity[order], atol=1e-5)


def test_rerank_marks_missing_neighbours(vectors):
    rows = np.array([[3, -1, -1, -1]])
    scores, top = fx.rerank(vectors, vectors[:1], rows, 3, faiss.METRIC_INNER_PRODUCT)
    assert top.tolist() == [[3, -1, -1]] and np.isinf(scores[0, 1:]).all()


def test_files_live_where_the_store_says(vectors, tmp_path):
    store = fx.IndexStore(tmp_path / "index")
    files = store.ondisk(store.filename(7))
    assert {files.index, files.ivfdata, files.vectors, files.ids, files.shards} == {
        store.path(f"catalogue-000007{suffix}") for suffix in (".faiss", ".ivfdata", ".vectors.npy", ".ids.npy", ".shards")}
    write_catalogue(files, vectors, np.arange(N) * 2, np.float16)
    stages = fx.build_ondisk(files, "cosine", FACTORY, train_size=10_000, shard_size=8_000)
    assert set(stages) == {"train", "add", "merge"}
    built = sorted(p.name for p in store.directory.iterdir())
    assert built == ["catalogue-000007.faiss", "catalogue-000007.ids.npy", "catalogue-000007.ivfdata", "catalogue-000007.vectors.npy"]

    moved = fx.IndexStore(tmp_path / "moved")
    shutil.copytree(store.directory, moved.directory)  # the header finds its lists next to itself
    index = fx.load_ondisk(moved.ondisk(store.filename(7)))
    assert index.search(vectors[:20], 1)[1][:, 0].tolist() == (np.arange(20) * 2).tolist()

    assert store.cleanup({store.filename(7)}) == [] and sorted(p.name for p in store.directory.iterdir()) == built
    files.shards.mkdir()  # left by a killed build
    assert sorted(store.cleanup({store.filename(8)})) == sorted([*built, "catalogue-000007.shards"])
    assert list(store.directory.iterdir()) == []


def test_load_refuses_mismatched_files(vectors, template, tmp_path):
    files = fx.IndexStore(tmp_path).ondisk("catalogue-000002.faiss")
    write_catalogue(files, vectors[:1000], np.arange(1000))
    fx.merge_shards(template, [fx.add_shard(template, vectors[:1000], 0, tmp_path / "shard.faiss")], files)
    fx.write_ids(files, np.arange(999))
    with pytest.raises(ValueError, match="999 ids"):
        fx.load_ondisk(files)


@pytest.mark.parametrize("factory", ["IDMap2,IVF64,PQ8", "HNSW32", "NoSuchIndex"])
def test_train_refuses_what_cannot_go_on_disk(vectors, factory):
    with pytest.raises(ValueError, match="on-disk index factory"):
        fx.train_ivfpq(vectors[:2000], "cosine", factory)


def test_wants_ondisk_above_the_limit_for_ivf_factories_only(monkeypatch):
    monkeypatch.setattr(fx, "ONDISK_ABOVE", 100)
    assert fx.wants_ondisk(101, 64, "IVF4,PQ8") and fx.wants_ondisk(101, 64, "OPQ8,IVF4_HNSW32,PQ8")
    assert not fx.wants_ondisk(100, 64, "IVF4,PQ8")  # not above the limit
    assert not fx.wants_ondisk(10**9, 64, "HNSW32") and not fx.wants_ondisk(10**9, 64, "Flat")
    monkeypatch.setattr(fx, "ONDISK_ABOVE", fx.HNSW_LIMIT)
    assert fx.wants_ondisk(fx.HNSW_LIMIT + 1, 256, fx.choose_factory(fx.HNSW_LIMIT + 1, 256))  # the automatic choice above 1M


def test_a_catalogue_above_the_limit_searches_and_dedups_from_its_on_disk_index(tmp_path, tiny_model, monkeypatch):
    """Past ``ONDISK_ABOVE`` the catalogue's IVF index is built on disk from the vector shards and searched
    memory-mapped: the same matches as an exact index in memory; a changed catalogue rebuilds it; a fresh
    process loads it; dedup walks its k-NN graph."""
    from tests.catalogues import catalogue_for, edited, tiles, write_catalogue as write_photos

    monkeypatch.setattr(fx, "ONDISK_ABOVE", 4)
    root = tmp_path / "photos"
    paths = write_photos(root, 10)
    exact = catalogue_for(tmp_path / "exact", tiny_model, index_factory="Flat")
    exact.index(root)
    ondisk = catalogue_for(tmp_path / "ondisk", tiny_model, index_factory="IVF2,Flat")
    report = ondisk.index(root)
    assert (report.index_action, report.ntotal, report.index_factory) == ("rebuilt", 10, "IVF2,Flat")
    files = ondisk.store.ondisk(fx.IndexStore.filename(report.generation))
    assert files.ivfdata.is_file() and files.vectors.is_file() and not files.shards.exists()
    index, _, stale = ondisk.current_index()
    assert isinstance(index, fx.OnDiskIndex) and not stale and sorted(fx.ids_of(index)) == list(range(1, 11))

    query = tmp_path / "query.jpg"
    edited(tiles()[6]).save(query)
    expected = [(m.source, m.head_score) for m in exact.search(query, k=4, candidates=8).matches]
    found = [(m.source, m.head_score) for m in ondisk.search(query, k=4, candidates=8).matches]
    assert [s for s, _ in found] == [s for s, _ in expected] and found[0][0] == str(paths[6])
    assert [h for _, h in found] == pytest.approx([h for _, h in expected], abs=1e-4)
    assert ondisk.index(root).index_action == "unchanged"

    write_photos(root, 1, start=10)
    again = ondisk.index(root)
    assert (again.index_action, again.ntotal, again.added) == ("rebuilt", 11, 1)
    assert ondisk.store.ondisk(fx.IndexStore.filename(again.generation)).ivfdata.is_file()
    fresh = catalogue_for(tmp_path / "ondisk", tiny_model, index_factory="IVF2,Flat")
    assert isinstance(fresh.current_index()[0], fx.OnDiskIndex) and fresh.current_index()[0].ntotal == 11
    assert fresh.dedup(k=3).n_candidates > 0
