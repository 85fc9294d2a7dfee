"""A catalogue indexed with a model that has a description codec stores compact descriptions (a few KiB an
item); a catalogue indexed before, with the same weights' float16 projections, is converted once by the next
index run, from the stored projections, and then searches as a catalogue indexed with the codec does."""

from __future__ import annotations

import shutil

import pytest
from sqlalchemy import select, update

from indexer import crud
from indexer.indexing import model_fingerprint
from indexer.models import Item
from tests.catalogues import catalogue_for, edited, tiles, write_catalogue

N = 12


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("compact")
    return root, write_catalogue(root / "photos", N)


@pytest.fixture(scope="module")
def full_catalogue(photos, tiny_model):
    """The photos indexed by the tiny model without a codec: descriptions as float16 projections."""
    root, _ = photos
    catalogue = catalogue_for(root / "full", tiny_model)
    catalogue.index(root / "photos")
    return catalogue


@pytest.fixture(scope="module")
def compact_catalogue(photos, tiny_codec_model):
    root, _ = photos
    catalogue = catalogue_for(root / "compact", tiny_codec_model)
    catalogue.index(root / "photos")
    return catalogue


class CountingModel:
    """The model, counting the images it runs the network on."""

    def __init__(self, model):
        self._model, self.images = model, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def feature_maps(self, images):
        self.images += len(images)
        return self._model.feature_maps(images)

    def encode(self, images):
        self.images += len(images)
        return self._model.encode(images)


def directory_bytes(directory) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def stored_sizes(catalogue) -> dict[str, list[int]]:
    """model key → the byte sizes of the descriptions stored with it."""
    with catalogue.db.session() as session:
        rows = session.execute(select(Item.model_key, Item.descriptors).where(Item.embedding.is_not(None)))
        sizes: dict[str, list[int]] = {}
        for key, blob in rows:
            sizes.setdefault(key, []).append(len(blob) if blob is not None else 0)
    return sizes


def top_results(catalogue, query) -> list[tuple[str, float]]:
    return [(m.source, m.head_score) for m in catalogue.search(query, k=5, candidates=8).matches]


def test_a_codec_model_stores_at_most_8_kib_per_description(compact_catalogue, full_catalogue, tiny_codec_model):
    sizes = stored_sizes(compact_catalogue)
    assert list(sizes) == [compact_catalogue.model_key]
    item_bytes = tiny_codec_model.codec.item_bytes(16)  # the tiny model's 4×4 grid
    assert sizes[compact_catalogue.model_key] == [item_bytes] * N and item_bytes <= 8192
    assert min(stored_sizes(full_catalogue)[full_catalogue.model_key]) > 8192
    assert compact_catalogue.model_key != full_catalogue.model_key


def test_an_old_catalogue_is_converted_once_without_reading_its_files(photos, full_catalogue, compact_catalogue,
                                                                       tiny_model, tiny_codec_model, tmp_path):
    root, paths = photos
    work = tmp_path / "old"
    shutil.copytree(root / "full" / "data", work / "data")
    old_key = model_fingerprint(tiny_model)
    assert model_fingerprint(tiny_codec_model, tiny_codec_model.recodable_format) == old_key
    with full_catalogue.db.session() as session:
        ids = crud.item_ids_by_source(session, [str(p) for p in paths])
    undescribed = ids[str(paths[3])]
    counting = CountingModel(tiny_codec_model)
    converted = catalogue_for(work, counting)
    with converted.db.session() as session:
        # One item as if indexed before descriptions were stored: it takes the new key and is described from its file.
        session.execute(update(Item).where(Item.id == undescribed).values(descriptors=None))
        crud.bump_version(session)
    before = directory_bytes(work / "data")
    report = converted.index(root / "photos", progress=True)
    assert counting.images == 1  # only the undescribed photo went through the network
    assert (report.recoded, report.described, report.embedded, report.updated) == (N - 1, 1, 0, 0)
    assert f"converted {N - 1} stored descriptions" in report.summary()
    assert report.index_action == "rebuilt" and report.ntotal == N
    sizes = stored_sizes(converted)
    assert list(sizes) == [converted.model_key] and set(sizes[converted.model_key]) == {tiny_codec_model.codec.item_bytes(16)}
    converted.db.dispose()
    assert directory_bytes(work / "data") < before - N * 8192  # the projections' space is given back

    query = tmp_path / "query.jpg"
    edited(tiles()[5]).save(query)
    got, expected = top_results(converted, query), top_results(compact_catalogue, query)
    assert [source for source, _ in got] == [source for source, _ in expected]
    assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=2e-3)
    assert got[0][0] == str(paths[5])
    again = converted.index(root / "photos")
    assert (again.recoded, again.described, again.embedded) == (0, 0, 0)  # once
