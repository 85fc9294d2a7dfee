"""Scanning, the incremental diff and the FAISS index files (no model needed)."""

from __future__ import annotations

import hashlib
import os

import faiss
import numpy as np
import pytest

from engine.errors import ImageLoadError
from indexer import faiss_index as fx
from indexer.catalogue import ItemState, diff, listing_from_path, read_indexed, scan


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_scan_folder_recursively_with_listing_keys(tmp_path):
    _touch(tmp_path / "listing_1" / "a.jpg")
    _touch(tmp_path / "listing_1" / "deeper" / "b.PNG")
    _touch(tmp_path / "c.webp")
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / ".hidden" / "d.jpg")
    result = scan(tmp_path)
    assert result.origin == str(tmp_path)
    got = {os.path.relpath(e.source, tmp_path): e.listing for e in result.entries}
    assert got == {"c.webp": None, "listing_1/a.jpg": "listing_1", "listing_1/deeper/b.PNG": "listing_1/deeper"}
    regex = scan(tmp_path, listing_regex=r"^(?P<listing>[^/]+)/")
    assert {e.listing for e in regex.entries} == {None, "listing_1"}


def test_listing_regex_forms():
    name = "bedroom/seattle_12_3.jpg"
    assert listing_from_path(name, None) == "bedroom"
    assert listing_from_path(name, r"^([^/]+/[^_]+_\d+)") == "bedroom/seattle_12"
    assert listing_from_path(name, r"(?P<listing>seattle_\d+)") == "seattle_12"
    assert listing_from_path(name, r"seattle_\d+") == "seattle_12"
    assert listing_from_path(name, r"^boston") is None


def test_scan_csv_with_and_without_header(tmp_path):
    a = _touch(tmp_path / "imgs" / "a.jpg")
    b = _touch(tmp_path / "imgs" / "b.jpg")
    (tmp_path / "with_header.csv").write_text(
        f"path,listing\nimgs/a.jpg,L1\n{b.as_uri()},L2\nimgs/missing.jpg,L3\nhttps://example.invalid/x.jpg,L4\nimgs/a.jpg,L9\nimgs/doc.pdf,L5\n")
    result = scan(tmp_path / "with_header.csv")
    assert [(e.source, e.listing) for e in result.entries] == [(str(a), "L1"), (str(b), "L2")]
    reasons = {os.path.basename(s.source): s.reason for s in result.skipped}
    assert reasons["missing.jpg"] == "file not found"
    assert "remote URIs are not supported" in reasons["x.jpg"]
    assert "unsupported file type" in reasons["doc.pdf"]
    (tmp_path / "plain.csv").write_text("imgs/a.jpg\nimgs/b.jpg,L2\n")
    plain = scan(tmp_path / "plain.csv")
    assert [(e.source, e.listing) for e in plain.entries] == [(str(a), None), (str(b), "L2")]
    (tmp_path / "groups.csv").write_text("path,group\nimgs/a.jpg,G\n")  # groups.csv style works too
    assert scan(tmp_path / "groups.csv").entries[0].listing == "G"
    with pytest.raises(ValueError):
        scan(a)
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "nope")


def test_diff_classifies_every_case(tmp_path):
    for name in ("same", "changed", "pending", "new", "relisted"):
        _touch(tmp_path / "L" / f"{name}.jpg")
    result = scan(tmp_path)
    entries = {os.path.basename(e.source): e for e in result.entries}

    def state(n, name, **changes):
        e = entries[name]
        values = dict(id=n, source=e.source, origin=result.origin, listing=e.listing, sha256="s", size=e.size,
                      mtime_ns=e.mtime_ns, embedded=True)
        values.update(changes)
        return ItemState(**values)

    items = [
        state(1, "same.jpg"),
        state(2, "changed.jpg", mtime_ns=entries["changed.jpg"].mtime_ns - 1),
        state(3, "pending.jpg", embedded=False),
        state(4, "relisted.jpg", listing="old"),
        ItemState(5, str(tmp_path / "L" / "gone.jpg"), result.origin, "L", "s", 1, 1, True),
        ItemState(6, "/elsewhere/x.jpg", "/elsewhere", None, "s", 1, 1, True),  # another origin: untouched
    ]
    d = diff(result, items)
    assert d.unchanged == 1 and d.n_new == 1
    assert sorted((os.path.basename(w.entry.source), w.item.id if w.item else None) for w in d.work) == [
        ("changed.jpg", 2), ("new.jpg", None), ("pending.jpg", 3)]
    assert d.relisted == [(4, "L", result.origin)]
    assert d.deleted == [5]


def test_choose_factory_by_size():
    assert fx.choose_factory(10, 256) == "Flat"
    assert fx.choose_factory(fx.EXACT_LIMIT, 256) == "Flat"
    assert fx.choose_factory(fx.EXACT_LIMIT + 1, 256) == "HNSW32"
    assert fx.choose_factory(4_000_000, 256) == "IVF8192_HNSW32,PQ32"
    assert fx.choose_factory(4_000_000, 2).startswith("HNSW")


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat", "IDMap2,Flat"])
def test_build_search_save_load(tmp_path, factory):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(200, dtype=np.int64) * 3 + 7
    index = fx.build_index(vectors, ids, "cosine", factory)
    assert isinstance(index, faiss.IndexIDMap2) and index.ntotal == 200
    scores, found = fx.search(index, vectors[:5], 3)
    assert list(found[:, 0]) == list(ids[:5]) and np.allclose(scores[:, 0], 1.0, atol=1e-4)
    path = fx.save_index(index, tmp_path / "idx" / "catalogue-000001.faiss")
    assert [p.name for p in path.parent.iterdir()] == ["catalogue-000001.faiss"]  # no temporary file left
    loaded = fx.load_index(path)
    assert loaded.ntotal == 200 and sorted(fx.ids_of(loaded)) == sorted(ids)


def test_remove_and_l2_scores():
    vectors = np.eye(4, dtype=np.float32)
    flat = fx.build_index(vectors, np.array([1, 2, 3, 4]), "l2", "Flat")
    assert fx.remove(flat, np.array([2])) == 1 and sorted(fx.ids_of(flat)) == [1, 3, 4]
    scores, ids = fx.search(flat, vectors[:1], 2)
    assert ids[0, 0] == 1 and scores[0, 0] == pytest.approx(0.0) and scores[0, 1] == pytest.approx(-np.sqrt(2), abs=1e-5)
    hnsw = fx.build_index(vectors, np.array([1, 2, 3, 4]), "cosine", "HNSW8")
    with pytest.raises(RuntimeError):
        fx.remove(hnsw, np.array([2]))


def test_bad_factory_is_a_clear_error():
    with pytest.raises(ValueError, match="invalid FAISS index factory"):
        fx.new_index(16, "cosine", "NoSuchIndex42")
    with pytest.raises(ValueError, match="cannot train"):
        fx.build_index(np.zeros((3, 16), np.float32), np.arange(3), "cosine", "IVF64,Flat")


def test_store_cleanup_keeps_named_files(tmp_path):
    store = fx.IndexStore(tmp_path)
    for name in ("catalogue-000001.faiss", "catalogue-000002.faiss", ".catalogue-000003.faiss.99.tmp", "other.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(store.cleanup({"catalogue-000002.faiss"})) == [".catalogue-000003.faiss.99.tmp", "catalogue-000001.faiss"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalogue-000002.faiss", "other.txt"]


def test_an_items_bytes_are_read_as_they_were_indexed(tmp_path):
    """What is derived from an item's file after indexing (pixels, keypoints) must come from the bytes
    indexed: a replaced or missing file says so instead of standing in for another photo."""
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"indexed bytes")
    indexed = hashlib.sha256(b"indexed bytes").hexdigest()
    assert read_indexed(str(photo), indexed) == b"indexed bytes"
    photo.write_bytes(b"other bytes")
    with pytest.raises(ImageLoadError, match="changed since it was indexed"):
        read_indexed(str(photo), indexed)
    photo.unlink()
    with pytest.raises(ImageLoadError, match="cannot read file"):
        read_indexed(str(photo), indexed)
