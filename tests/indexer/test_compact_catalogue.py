"""A catalogue indexed with a model that has a description codec stores compact descriptions (a few KiB an
item); a catalogue indexed before, with the same weights' float16 projections, is converted once by the next
index run, from the stored projections, and then searches as a catalogue indexed with the codec does."""

from __future__ import annotations

import shutil

import pytest
from sqlalchemy import select

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
        keys = dict(session.execute(select(Item.id, Item.model_key).where(Item.shard.is_not(None))).all())
        sizes: dict[str, list[int]] = {}
        for key in set(keys.values()):
            for blob in catalogue.db.vectors.descriptions(session, [i for i, k in keys.items() if k == key], key).values():
                sizes.setdefault(key, []).append(len(blob))
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
    counting = CountingModel(tiny_codec_model)
    converted = catalogue_for(work, counting)
    before = directory_bytes(work / "data")
    report = converted.index(root / "photos", progress=True)
    assert counting.images == 0  # no photo went through the network
    assert (report.recoded, report.embedded, report.updated) == (N, 0, 0)
    assert f"converted {N} stored descriptions" in report.summary()
    assert report.index_action == "rebuilt" and report.ntotal == N
    sizes = stored_sizes(converted)
    assert list(sizes) == [converted.model_key] and set(sizes[converted.model_key]) == {tiny_codec_model.codec.item_bytes(16)}
    converted.db.dispose()
    assert directory_bytes(work / "data") < before - N * 8192  # the projections' shards are deleted

    query = tmp_path / "query.jpg"
    edited(tiles()[5]).save(query)
    got, expected = top_results(converted, query), top_results(compact_catalogue, query)
    assert [source for source, _ in got] == [source for source, _ in expected]
    assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=2e-3)
    assert got[0][0] == str(paths[5])
    again = converted.index(root / "photos")
    assert (again.recoded, again.embedded) == (0, 0)  # once
