"""``Catalogue``: the indexer's Python API — one object holding the model, the database and the index.

    from indexer import Catalogue
    catalogue = Catalogue.from_settings(Settings())          # or Catalogue("data", model=my_model)
    catalogue.index("photos/")                               # incremental; rebuild=True starts over
    result = catalogue.search("query.jpg", k=10, explain_dir="out/why")
    report = catalogue.dedup(precision=0.95, labels="photos/groups.csv")
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import faiss

from engine.config import BACKBONE_BATCH, Settings
from indexer import faiss_index as fx
from indexer.db import Database, get_database
from indexer.dedup import DedupOptions, DedupReport, find_duplicates, stored_report
from indexer.indexing import IndexOptions, IndexReport, index_catalogue, load_current_index, model_fingerprint, run_lock

if TYPE_CHECKING:  # search draws in torch and matplotlib; reading stored dedup runs needs neither
    from indexer.search import SearchResult


def _stderr(message: str) -> None:
    print(f"whymatch: {message}", file=sys.stderr)


class Catalogue:
    """A catalogue in ``data_dir`` (index files) and a database (SQLite in ``data_dir`` by default)."""

    def __init__(self, data_dir: str | os.PathLike, *, database_url: str | None = None, model=None,
                 model_path: str | os.PathLike | None = None, threads: int = 0, batch_size: int = 32,
                 backbone_batch: int = BACKBONE_BATCH, index_factory: str | None = None, db: Database | None = None,
                 log: Callable[[str], None] | None = _stderr) -> None:
        self.data_dir = Path(data_dir)
        self.database_url = database_url or f"sqlite:///{(self.data_dir / 'whymatch.db').as_posix()}"
        self._db = db
        self.index_dir = self.data_dir / "index"
        self.store = fx.IndexStore(self.index_dir)
        self.batch_size = batch_size
        self.backbone_batch = backbone_batch
        self.index_factory = index_factory
        self.log = log
        self._model = model
        self._model_path = model_path
        self._threads = threads
        self._model_key: str | None = None
        self._index: tuple[int | None, faiss.Index, bool] | None = None
        # Guards ``_index``: the API searches from several threads while an index run may replace it.
        self._index_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, model=None, **overrides) -> Catalogue:
        kwargs = dict(database_url=settings.database_url, model_path=settings.model_path, threads=settings.threads,
                      batch_size=settings.batch_size, backbone_batch=settings.backbone_batch,
                      index_factory=settings.index_factory)
        kwargs.update(overrides)
        return cls(settings.data_dir, model=model, **kwargs)

    @property
    def db(self) -> Database:
        """The database, opened (and migrated) on first use."""
        if self._db is None:
            self._db = get_database(self.database_url)
        return self._db

    # ------------------------------------------------------------------ model

    @property
    def model(self):
        if self._model is None:
            from engine import load_model

            self._model = load_model(self._model_path, threads=self._threads, batch_size=self.backbone_batch)
        if self._threads > 0:
            import torch

            torch.set_num_threads(self._threads)
        return self._model

    @property
    def model_key(self) -> str:
        if self._model_key is None:
            self._model_key = model_fingerprint(self.model)
        return self._model_key

    def n_indexed(self) -> int:
        """Items embedded with this model: what search and dedup can find."""
        from indexer import crud

        with self.db.session() as session:
            return crud.count_embedded(session, self.model_key)

    # ------------------------------------------------------------------ operations

    def index(self, path: str | os.PathLike, *, rebuild: bool = False, index_factory: str | None = None,
              listing_regex: str | None = None, max_pixels: int | None = None, progress: bool | None = None) -> IndexReport:
        options = IndexOptions(rebuild=rebuild, index_factory=index_factory or self.index_factory,
                               batch_size=self.batch_size, listing_regex=listing_regex, progress=progress)
        if max_pixels is not None:
            options.max_pixels = max_pixels
        report = index_catalogue(path, model=self.model, db=self.db, index_dir=self.index_dir, options=options, log=self.log)
        with self._index_lock:
            self._index = None
        return report

    def current_index(self) -> tuple[faiss.Index, int | None, bool]:
        """(index, generation id or None, stale) — loaded once, reloaded when a newer generation exists."""
        from indexer import crud

        with self.db.session() as session:
            latest = crud.latest_generation(session)
        latest_id = latest.id if latest is not None else None
        with self._index_lock:
            if self._index is None or self._index[0] != latest_id or latest_id is None:
                model = self.model
                index, generation, stale = load_current_index(self.db, self.store, model_key=self.model_key, metric=model.metric,
                                                              dim=int(model.config.embed_dim), log=self.log)
                self._index = (generation.id if generation is not None else None, index, stale)
            generation_id, index, stale = self._index
        return index, generation_id, stale

    def search(self, query, *, k: int = 10, candidates: int | None = None, exclude_self: bool = True,
               explain: bool = False, explain_dir: str | os.PathLike | None = None, method: str = "gradcam",
               effects: bool = False, concepts: bool = False) -> SearchResult:
        """The ``k`` best matches of an image (path, bytes, PIL image or array); see ``indexer.search``."""
        from indexer.search import SearchOptions, search

        options = SearchOptions(k=k, candidates=candidates, explain=explain, explain_dir=explain_dir, method=method,
                                effects=effects, concepts=concepts, exclude_self=exclude_self)
        index, generation, stale = self.current_index()
        return search(query, options, model=self.model, db=self.db, index=index, model_key=self.model_key,
                      generation=generation, stale_index=stale)

    def search_item(self, item_id: int, *, k: int = 10, candidates: int | None = None, exclude_self: bool = True,
                    explain: bool = False, explain_dir: str | os.PathLike | None = None, method: str = "gradcam",
                    effects: bool = False, concepts: bool = False) -> SearchResult:
        """More like catalogue item ``item_id``, from what the catalogue stores of it (``UnknownItemError`` for an
        unknown id); the options are those of ``search``."""
        from indexer.search import SearchOptions, search_item

        options = SearchOptions(k=k, candidates=candidates, explain=explain, explain_dir=explain_dir, method=method,
                                effects=effects, concepts=concepts, exclude_self=exclude_self)
        index, generation, stale = self.current_index()
        return search_item(item_id, options, model=self.model, db=self.db, index=index, model_key=self.model_key,
                           generation=generation, stale_index=stale)

    def dedup(self, *, k: int = 10, threshold: float | None = None, precision: float | None = None,
              labels: str | os.PathLike | None = None, min_index_similarity: float | None = None) -> DedupReport:
        options = DedupOptions(k=k, threshold=threshold, precision=precision, labels=labels,
                               min_index_similarity=min_index_similarity, pair_batch=self.batch_size)
        with run_lock(self.index_dir, self.log):
            index, generation, _ = self.current_index()
            return find_duplicates(model=self.model, db=self.db, index=index, model_key=self.model_key,
                                   generation_id=generation, options=options)

    def dedup_run(self, run_id: int | None = None) -> DedupReport | None:
        """A stored dedup run (the newest unless ``run_id``) as ``dedup`` reported it, without finding
        duplicates again (no model needed); None when there is no such run."""
        return stored_report(self.db, run_id)
