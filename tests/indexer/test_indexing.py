"""Indexing runs with the tiny untrained model: incremental updates, exact duplicates, broken files, formats."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from tests.catalogues import catalogue_for, stored_rows, tiles, write_catalogue
from PIL import Image
from sqlalchemy import select

from indexer import faiss_index as fx
from indexer.models import IndexGeneration, Item
from whymatch.cli import main


def _items(catalogue) -> dict[str, Item]:
    with catalogue.db.session() as session:
        return {os.path.basename(item.source): item for item in session.scalars(select(Item))}


def _index_file(catalogue, generation: int):
    return fx.load_index(catalogue.store.path(fx.IndexStore.filename(generation)))


def test_incremental_runs_add_change_delete_and_touch_nothing_else(tmp_path, tiny_model, database_url):  # noqa: F811
    root = tmp_path / "photos"
    paths = write_catalogue(root, 6)
    catalogue = catalogue_for(tmp_path, tiny_model, database_url)

    first = catalogue.index(root)
    assert (first.added, first.updated, first.removed, first.embedded, first.skipped) == (6, 0, 0, 6, [])
    assert first.index_action == "rebuilt" and first.ntotal == 6 and first.index_factory == "Flat"
    before, stored_before = _items(catalogue), stored_rows(catalogue)
    assert {item.listing for item in before.values()} == {"listing_0", "listing_1", "listing_2", "listing_3"}

    again = catalogue.index(root)  # nothing changed: nothing written, no new index generation
    assert (again.added, again.updated, again.removed, again.touched, again.unchanged, again.embedded) == (0, 0, 0, 0, 6, 0)
    assert again.index_action == "unchanged" and again.generation == first.generation

    new = write_catalogue(root, 2, start=6)
    tiles()[10].save(paths[1], quality=90)  # changed bytes
    paths[2].unlink()  # deleted
    os.utime(paths[3], ns=(1_000_000_000, 1_000_000_000))  # touched: new mtime, same bytes
    third = catalogue.index(root)
    assert (third.added, third.updated, third.removed, third.touched, third.unchanged, third.embedded) == (2, 1, 1, 1, 3, 3)
    assert third.index_action == "updated" and third.ntotal == 7 and third.generation == first.generation + 1

    after, stored = _items(catalogue), stored_rows(catalogue)
    assert set(after) == {p.name for p in [*paths, *new] if p.exists()}
    for name in ("photo_000.jpg", "photo_004.jpg", "photo_005.jpg"):  # untouched rows: not rewritten
        assert after[name].updated_at == before[name].updated_at
        assert np.array_equal(stored[after[name].source][0], stored_before[before[name].source][0])
    changed = after["photo_001.jpg"]
    assert changed.id == before["photo_001.jpg"].id and changed.sha256 != before["photo_001.jpg"].sha256
    expected = tiny_model.embed([paths[1]])[0]
    assert np.allclose(stored[changed.source][0], expected, atol=2e-3)  # the same pixels as a query would see
    assert after["photo_003.jpg"].mtime_ns == 1_000_000_000
    assert np.array_equal(stored[after["photo_003.jpg"].source][0], stored_before[before["photo_003.jpg"].source][0])

    index = _index_file(catalogue, third.generation)
    assert sorted(fx.ids_of(index)) == sorted(item.id for item in after.values())
    assert not catalogue.store.path(fx.IndexStore.filename(first.generation - 1 if first.generation > 1 else 0)).exists()


def test_every_scanned_file_is_counted_once(tmp_path, tiny_model):
    """The report's file counts add up to the files scanned, on a second run too, where files rewritten with
    the same bytes (as `whymatch demo` does) are metadata-only changes."""
    root = tmp_path / "photos"
    paths = write_catalogue(root, 5)
    (root / "bad.jpg").write_bytes(b"nope")
    catalogue = catalogue_for(tmp_path, tiny_model)
    first = catalogue.index(root)
    write_catalogue(root, 1, start=5)  # new
    tiles()[10].save(paths[1], quality=90)  # changed bytes
    paths[2].unlink()  # deleted: an item removed, no file scanned
    for path in (paths[0], paths[3], paths[4]):  # the same bytes written again
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    second = catalogue.index(root)
    assert (second.added, second.updated, second.touched, second.unchanged, len(second.skipped), second.removed) == (1, 1, 3, 0, 1, 1)
    for report in (first, second, catalogue.index(root)):
        assert report.added + report.updated + report.touched + report.unchanged + len(report.skipped) == report.scanned == 6
        printed = re.search(r"(\d+) files in .* — (\d+) added, (\d+) re-embedded, (\d+) metadata-only, (\d+) unchanged, "
                            r"(\d+) skipped\n", report.summary())
        scanned, *categories = map(int, printed.groups())
        assert scanned == report.scanned and sum(categories) == scanned


def test_exact_duplicates_are_recorded_without_re_embedding(tmp_path, tiny_model, database_url):  # noqa: F811
    root = tmp_path / "photos"
    a, b, _ = write_catalogue(root, 3)
    shutil.copy(a, root / "listing_2" / "copy_of_a.jpg")  # same batch as its original
    catalogue = catalogue_for(tmp_path, tiny_model, database_url)
    first = catalogue.index(root)
    assert (first.added, first.embedded, first.exact_duplicates) == (4, 3, 1)
    shutil.copy(b, root / "listing_2" / "copy_of_b.jpg")  # a later run: copied from the database
    second = catalogue.index(root)
    assert (second.added, second.embedded, second.exact_duplicates) == (1, 0, 1)
    items, stored = _items(catalogue), stored_rows(catalogue)
    assert items["copy_of_a.jpg"].sha256 == items[a.name].sha256
    for copy, original in (("copy_of_a.jpg", a.name), ("copy_of_b.jpg", b.name)):
        assert np.array_equal(stored[items[copy].source][0], stored[items[original].source][0])
        assert stored[items[copy].source][1] == stored[items[original].source][1]
    assert (items["copy_of_b.jpg"].width, items["copy_of_b.jpg"].height) == (150, 120)
    assert second.ntotal == 5  # copies are searchable items too


def _png_header_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_broken_files_are_skipped_with_their_reason(tmp_path, tiny_model):
    root = tmp_path / "photos"
    good = write_catalogue(root, 3)
    data = good[0].read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image")
    (root / "bomb.png").write_bytes(_png_header_bomb())
    tiles()[5].resize((400, 300)).save(root / "large.jpg")
    catalogue = catalogue_for(tmp_path, tiny_model)
    report = catalogue.index(root, max_pixels=100_000)
    reasons = {os.path.basename(s.source): s.reason for s in report.skipped}
    assert set(reasons) == {"truncated.jpg", "empty.png", "text.jpg", "bomb.png", "large.jpg"}
    assert "truncated" in reasons["truncated.jpg"]
    assert "empty file" in reasons["empty.png"]
    assert "not an image" in reasons["text.jpg"]
    assert "decompression bomb" in reasons["bomb.png"] and "decompression bomb" in reasons["large.jpg"]
    assert report.added == 3 and report.ntotal == 3 and "5 skipped" in report.summary()

    (root / "listing_0" / "photo_000.jpg").write_bytes(b"broken now")  # a good file turns bad: out of the catalogue
    later = catalogue.index(root, max_pixels=100_000)
    assert later.removed == 1 and later.ntotal == 2 and len(later.skipped) == 6


def test_colour_modes_and_formats_are_indexed(tmp_path, tiny_model):
    root = tmp_path / "photos"
    root.mkdir()
    base = tiles()[2]
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "alpha.png")
    base.convert("CMYK").save(root / "cmyk.jpg")
    grey16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(grey16).save(root / "grey16.png")
    assert Image.open(root / "grey16.png").mode.startswith("I")
    base.convert("L").save(root / "grey.jpg")
    base.save(root / "photo.webp")
    rotated = tiles()[3]
    exif = rotated.getexif()
    exif[0x0112] = 6  # displayed rotated by 90°: 120 wide, 150 high
    rotated.save(root / "exif.jpg", exif=exif)
    catalogue = catalogue_for(tmp_path, tiny_model)
    report = catalogue.index(root)
    assert report.skipped == [] and report.added == 6
    items = _items(catalogue)
    assert (items["exif.jpg"].width, items["exif.jpg"].height) == (120, 150)
    assert (items["photo.webp"].width, items["photo.webp"].height) == (150, 120)
    paths = sorted(root.iterdir())
    expected = tiny_model.embed(paths)
    stored = stored_rows(catalogue)
    for path, vector in zip(paths, expected):
        assert np.allclose(stored[str(path)][0], vector, atol=2e-3), path.name
    grey = stored[str(root / "grey16.png")][0]
    assert np.dot(grey, stored[str(root / "grey.jpg")][0]) > 0.95  # 16-bit scaled, not clipped to white


def test_rebuild_starts_over_and_keeps_ids(tmp_path, tiny_model):
    root, other = tmp_path / "photos", tmp_path / "other"
    write_catalogue(root, 4)
    write_catalogue(other, 2, start=10)
    catalogue = catalogue_for(tmp_path, tiny_model)
    catalogue.index(other)
    first = catalogue.index(root)
    assert first.ntotal == 6  # two origins, one catalogue
    ids = {name: item.id for name, item in _items(catalogue).items()}
    rebuilt = catalogue.index(root, rebuild=True)  # starts this origin over; the other keeps its embeddings
    assert (rebuilt.updated, rebuilt.embedded, rebuilt.index_action, rebuilt.ntotal) == (4, 4, "rebuilt", 6)
    assert rebuilt.generation > first.generation
    assert {name: item.id for name, item in _items(catalogue).items()} == ids
    files = sorted(p.name for p in catalogue.index_dir.glob("*.faiss"))
    assert files == [fx.IndexStore.filename(first.generation), fx.IndexStore.filename(rebuilt.generation)]  # last two kept


def test_index_factory_string_and_hnsw_deletions(tmp_path, tiny_model):
    root = tmp_path / "photos"
    paths = write_catalogue(root, 5)
    catalogue = catalogue_for(tmp_path, tiny_model, index_factory="HNSW16")
    first = catalogue.index(root)
    assert first.index_factory == "HNSW16" and first.ntotal == 5
    paths[0].unlink()  # HNSW cannot remove ids: the index is rebuilt from the database's embeddings
    second = catalogue.index(root)
    assert second.index_action == "rebuilt" and second.ntotal == 4
    with catalogue.db.session() as session:
        generation = session.get(IndexGeneration, second.generation)
        assert generation.factory == "HNSW16" and generation.n_removed == 1 and generation.status == "complete"
    with pytest.raises(ValueError, match="invalid FAISS index factory"):
        catalogue.index(root, index_factory="Bogus99")


def test_csv_catalogue_with_listings(tmp_path, tiny_model):
    paths = write_catalogue(tmp_path / "photos", 3)
    table = tmp_path / "catalogue.csv"
    table.write_text("path,listing\n" + "".join(f"photos/{p.parent.name}/{p.name},L{n}\n" for n, p in enumerate(paths)))
    catalogue = catalogue_for(tmp_path, tiny_model)
    assert catalogue.index(table).added == 3
    assert sorted(item.listing for item in _items(catalogue).values()) == ["L0", "L1", "L2"]
    table.write_text("path,listing\n" + f"photos/{paths[0].parent.name}/{paths[0].name},NEW\n")
    report = catalogue.index(table)
    assert (report.removed, report.touched, report.ntotal) == (2, 1, 1)
    assert [item.listing for item in _items(catalogue).values()] == ["NEW"]


def test_index_command(tmp_path, tiny_checkpoint):  # noqa: F811
    root = tmp_path / "photos"
    write_catalogue(root, 3)
    (root / "bad.jpg").write_bytes(b"nope")
    env = {"WHYMATCH_DATA_DIR": str(tmp_path / "data"), "WHYMATCH_MODEL_PATH": str(tiny_checkpoint), "WHYMATCH_BATCH_SIZE": "4"}
    result = CliRunner().invoke(main, ["index", str(root), "--json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["added"] == 3 and report["skipped"][0]["reason"].startswith("not an image")
    assert f"skipped {root / 'bad.jpg'}: not an image" in result.stderr
    assert (tmp_path / "data" / "whymatch.db").is_file()
    result = CliRunner().invoke(main, ["index", str(root)], env=env)
    assert result.exit_code == 0 and "3 unchanged" in result.stdout and "1 skipped" in result.stdout
    result = CliRunner().invoke(main, ["index", str(root / "listing_0" / "photo_000.jpg")], env=env)
    assert result.exit_code != 0 and "expected a folder of images or a .csv file" in result.output
