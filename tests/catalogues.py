"""Fixtures and helpers for the catalogue tests (indexer, API, web): distinct small photos, database URLs
(SQLite and PostgreSQL), a tiny checkpoint; registered for every test by ``tests/conftest.py``."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

POSTGRES_ENV = "WHYMATCH_TEST_POSTGRES_URL"
_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel",
           "retina", "camera", "brick", "cell", "clock", "coins", "grass", "gravel", "moon", "page", "text")
_tiles: list[Image.Image] | None = None


def tiles() -> list[Image.Image]:
    """72 distinct RGB pictures (150×120): quarters of 18 of scikit-image's sample images; the first 18
    come from 18 different photos (clearly different to even an untrained model)."""
    global _tiles
    if _tiles is None:
        from skimage import data

        photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in _PHOTOS]
        out = []
        for (x, y) in ((0, 0), (1, 1), (1, 0), (0, 1)):  # the first 18 come from 18 different photos
            for image in photos:
                w, h = image.size
                out.append(image.crop((x * w // 2, y * h // 2, (x + 1) * w // 2, (y + 1) * h // 2)).resize((150, 120)))
        _tiles = out
    return _tiles


def edited(image: Image.Image) -> Image.Image:
    """A near-duplicate: cropped by ~6%, brighter, re-encoded elsewhere."""
    w, h = image.size
    return ImageEnhance.Brightness(image.crop((w // 16, h // 16, w - w // 20, h - h // 20))).enhance(1.15).resize((150, 120))


def write_catalogue(root: Path, n: int, *, start: int = 0, listings: int = 4) -> list[Path]:
    """n distinct JPEGs in root/listing_<k>/photo_<i>.jpg; returns their paths."""
    pictures = tiles()
    paths = []
    for i in range(start, start + n):
        folder = root / f"listing_{i % listings}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"photo_{i:03d}.jpg"
        pictures[i % len(pictures)].save(path, quality=90)
        paths.append(path)
    return paths


def stored_rows(catalogue) -> dict[str, tuple[np.ndarray, bytes]]:  # noqa: ANN001 - an indexer.Catalogue
    """source → (embedding as float32, packed description) of every item embedded by the catalogue's model,
    as its vector shards hold them."""
    from indexer import crud

    with catalogue.db.session() as session:
        ids = crud.embedded_ids(session, catalogue.model_key).tolist()
        sources = {item_id: item.source for item_id, item in crud.items_by_ids(session, ids).items()}
        rows = catalogue.db.vectors.rows(session, ids, catalogue.model_key)
    return {sources[i]: (np.asarray(vector, np.float32), description) for i, (vector, description) in rows.items()}


def _admin_url(url: str) -> tuple[str, str]:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return parsed.set(database="postgres").render_as_string(hide_password=False), parsed.database


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path: Path):
    """A fresh, empty database: a SQLite file, or a new database on the server in $WHYMATCH_TEST_POSTGRES_URL."""
    if request.param == "sqlite":
        yield f"sqlite:///{(tmp_path / 'db' / 'whymatch.db').as_posix()}"
        return
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"PostgreSQL not configured: set {POSTGRES_ENV} (e.g. eval \"$(bash .ci/postgres.sh start)\")")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"whymatch_{uuid.uuid4().hex[:12]}"
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        from indexer import db as dbmod

        for key in [k for k in dbmod._cache if name in k[0]]:
            dbmod._cache.pop(key).dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model) -> Path:
    """The tiny untrained model saved as a checkpoint, for the CLI and subprocesses (WHYMATCH_MODEL_PATH)."""
    return tiny_model.save(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_codec_model(tiny_model):
    """The tiny model's weights with a description codec (32 slices) fitted on the local descriptors of the
    72 tiles: it stores compact descriptions, and its catalogue key differs."""
    import torch

    from engine.inference import SimilarityModel
    from engine.nn.compact import DescriptionCodec

    fmaps = tiny_model.feature_maps(tiles())
    with torch.no_grad():
        cells = tiny_model.net.local_descriptors(fmaps).flatten(0, 1)
    codec = DescriptionCodec.fit(cells, tiny_model.config.embed_dim, subquantizers=32, iterations=10)
    return SimilarityModel(tiny_model.net, tiny_model.config, tiny_model.batch_size, codec=codec)


def catalogue_for(tmp_path: Path, model, database_url: str | None = None, **kwargs):
    """A Catalogue in tmp_path/data with an injected model (no shipped model needed)."""
    from indexer import Catalogue

    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("log", None)
    return Catalogue(tmp_path / "data", database_url=database_url, model=model, **kwargs)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The indexer tests push tiny batches of 128-px images through the network: one thread does that
    several times faster than two on a shared 2-core machine (no OpenMP barrier waits)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
