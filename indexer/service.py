"""``Catalogue``: the indexer's Python API — one object holding the model, the database and the index.

    from indexer import Catalogue
    catalogue = Catalogue.from_settings(StorageSettings(), ModelSettings())   # or Catalogue("data", model=my_model)
    catalogue.index("photos/")                               # incremental; rebuild=True starts over
    result = catalogue.search("query.jpg", k=10, explain_dir="out/why")
    report = catalogue.dedup(precision=0.95, labels="photos/groups.csv")
    explanation = catalogue.compare("query.jpg", 42, figure="out/pair.png")   # an image against item 42
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

import numpy as np

from engine.config import ModelSettings
from engine.errors import ImageLoadError
from engine.images import ImageSource, image_size, load_pixels
from indexer import crud
from indexer import faiss_index as fx
from indexer.catalogue import read_indexed
from indexer.db import Database, get_database
from indexer.dedup import DedupOptions, DedupReport, find_duplicates, stored_report
from indexer.distributed import RayCluster, dedup_on_ray, index_on_ray
from indexer.model import CatalogueModel
from indexer.indexing import IndexOptions, IndexReport, index_catalogue, load_current_index, model_fingerprint, run_lock
from indexer.settings import StorageSettings, sqlite_url, vectors_path

if TYPE_CHECKING:  # search draws in torch and matplotlib; reading stored dedup runs needs neither
    from engine.explain.pairs import PairExplanation
    from indexer.models import Item
    from indexer.search import SearchResult


def _stderr(message: str) -> None:
    print(f"whymatch: {message}", file=sys.stderr)


def catalogue_path(source: str, origin: str) -> str:
    """Where an item lies in its catalogue, as clients may see it: its path relative to the folder it was
    indexed from (a CSV's own folder), so no absolute server path leaves the server; the file name alone
    for a CSV row outside that folder."""
    path, root = PurePath(source), PurePath(origin)
    for folder in (root, root.parent):
        if path.is_relative_to(folder):
            return path.relative_to(folder).as_posix()
    return path.name


class ItemImageError(ImageLoadError):
    """A catalogue item's file is missing or no longer decodes: ``item_id`` says which item, ``missing``
    whether the file is gone, ``reason`` what the decoder said."""

    def __init__(self, item_id: int, cause: ImageLoadError) -> None:
        super().__init__(f"item {item_id}: {cause}")
        self.item_id = item_id
        self.reason = str(cause)
        self.missing = isinstance(cause.__cause__, FileNotFoundError)


@dataclass(frozen=True)
class ModelSummary:
    """What a client may know of the catalogue's model."""

    preset: str
    backbone: str
    input_size: int
    embed_dim: int
    threshold: float  # the decision of one pair (match / no match)
    duplicate_threshold: float  # where dedup draws the line without a stored calibration
    key: str  # fingerprint of the config and weights (``model_key``)


@dataclass(frozen=True)
class ScoredPair:
    """Two catalogue items and how alike they are: by the index (embeddings) and by the head."""

    item_a: int
    item_b: int
    source_a: str
    source_b: str
    index_similarity: float
    head_score: float


class Catalogue:
    """A catalogue in ``data_dir`` (index files), a database (SQLite in ``data_dir`` by default) and vector
    shards (``vectors/`` in ``data_dir`` by default)."""

    def __init__(self, data_dir: str | os.PathLike, *, database_url: str | None = None, vectors_url: str | None = None,
                 model: CatalogueModel | None = None,
                 model_settings: ModelSettings | None = None, batch_size: int = 32, index_factory: str | None = None,
                 db: Database | None = None, log: Callable[[str], None] | None = _stderr) -> None:
        """``model`` is a loaded model; without one, ``model_settings`` say which to load on first use
        (the shipped one by default)."""
        self.data_dir = Path(data_dir)
        self.database_url = database_url or sqlite_url(self.data_dir)
        self.vectors_url = vectors_url or vectors_path(self.data_dir)
        self._db = db
        self.index_dir = self.data_dir / "index"
        self.store = fx.IndexStore(self.index_dir)
        self.batch_size = batch_size
        self.index_factory = index_factory
        self.log = log
        self._model = model
        self.model_settings = model_settings or ModelSettings.model_construct()  # the defaults, no environment
        self._model_key: str | None = None
        self._index: tuple[int | None, fx.CatalogueIndex, bool] | None = None
        # Guards ``_index``: the API searches from several threads while an index run may replace it.
        self._index_lock = threading.Lock()

    @classmethod
    def from_settings(cls, storage: StorageSettings, model_settings: ModelSettings, *, model: CatalogueModel | None = None,
                      log: Callable[[str], None] | None = _stderr) -> Catalogue:
        return cls(storage.data_dir, database_url=storage.database_url, vectors_url=storage.vectors_url, model=model, model_settings=model_settings,
                   batch_size=storage.batch_size, index_factory=storage.index_factory, log=log)

    @property
    def db(self) -> Database:
        """The database, opened (and migrated) on first use."""
        if self._db is None:
            self._db = get_database(self.database_url, self.vectors_url)
        return self._db

    # ------------------------------------------------------------------ model

    @property
    def model(self) -> CatalogueModel:
        if self._model is None:
            from engine import load_model  # defers torch: reading stored runs needs no model

            settings = self.model_settings
            self._model = load_model(settings.model_path, threads=settings.threads, batch_size=settings.backbone_batch,
                                     device=settings.device)
        if self.model_settings.threads > 0:
            import torch

            torch.set_num_threads(self.model_settings.threads)
        return self._model

    @property
    def model_key(self) -> str:
        if self._model_key is None:
            self._model_key = model_fingerprint(self.model)
        return self._model_key

    @property
    def input_size(self) -> int:
        """The side the model sees images at: decoding need not go finer (JPEGs are draft-decoded no smaller)."""
        return int(self.model.config.input_size)

    def model_summary(self) -> ModelSummary:
        """What clients are told of the model (``GET /api/health``, the demo), without handing them the model."""
        model = self.model
        return ModelSummary(model.config.preset, model.config.backbone, int(model.config.input_size),
                            int(model.config.embed_dim), float(model.threshold), float(model.duplicate_threshold),
                            self.model_key)

    def n_indexed(self) -> int:
        """Items embedded with this model: what search and dedup can find."""
        with self.db.session() as session:
            return crud.count_embedded(session, self.model_key)

    # ------------------------------------------------------------------ operations

    def index(self, path: str | os.PathLike, *, rebuild: bool = False, index_factory: str | None = None,
              listing_regex: str | None = None, max_pixels: int | None = None, progress: bool | None = None,
              ray: RayCluster | None = None) -> IndexReport:
        """Bring the catalogue of ``path`` (a folder or a CSV) up to date; with ``ray``, its files are read and
        embedded on that Ray cluster, by workers that load the model ``model_settings`` name."""
        options = IndexOptions(rebuild=rebuild, index_factory=index_factory or self.index_factory,
                               batch_size=self.batch_size, listing_regex=listing_regex, progress=progress)
        if max_pixels is not None:
            options.max_pixels = max_pixels
        if ray is not None:
            report = index_on_ray(path, ray, model=self.model, settings=self.model_settings, db=self.db,
                                  index_dir=self.index_dir, options=options, log=self.log)
        else:
            report = index_catalogue(path, model=self.model, db=self.db, index_dir=self.index_dir, options=options, log=self.log)
        with self._index_lock:
            self._index = None
        return report

    def current_index(self) -> tuple[fx.CatalogueIndex, int | None, bool]:
        """(index, generation id or None, stale) — loaded once, reloaded when a newer generation exists."""
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
               effects: bool = False, concepts: bool = False, verify: bool = False) -> SearchResult:
        """The ``k`` best matches of an image (path, bytes, PIL image or array); see ``indexer.search``.
        ``verify`` also verifies them geometrically (part of each decision; ~45 ms a match)."""
        from indexer.search import SearchOptions, search  # defers torch and matplotlib

        options = SearchOptions(k=k, candidates=candidates, explain=explain, explain_dir=explain_dir, method=method,
                                effects=effects, concepts=concepts, exclude_self=exclude_self, verify=verify)
        index, generation, stale = self.current_index()
        return search(query, options, model=self.model, db=self.db, index=index, model_key=self.model_key,
                      generation=generation, stale_index=stale)

    def search_item(self, item_id: int, *, k: int = 10, candidates: int | None = None, exclude_self: bool = True,
                    explain: bool = False, explain_dir: str | os.PathLike | None = None, method: str = "gradcam",
                    effects: bool = False, concepts: bool = False, verify: bool = False) -> SearchResult:
        """More like catalogue item ``item_id``, from what the catalogue stores of it (``UnknownItemError`` for an
        unknown id); the options are those of ``search`` (``verify`` reads the item's file)."""
        from indexer.search import SearchOptions, search_item  # defers torch and matplotlib

        options = SearchOptions(k=k, candidates=candidates, explain=explain, explain_dir=explain_dir, method=method,
                                effects=effects, concepts=concepts, exclude_self=exclude_self, verify=verify)
        index, generation, stale = self.current_index()
        return search_item(item_id, options, model=self.model, db=self.db, index=index, model_key=self.model_key,
                           generation=generation, stale_index=stale)

    def dedup(self, *, k: int = 10, threshold: float | None = None, precision: float | None = None,
              labels: str | os.PathLike | None = None, min_index_similarity: float | None = None, verify: bool = True,
              ray: RayCluster | None = None) -> DedupReport:
        """Find, score, group and store the catalogue's duplicates (``indexer.dedup``), the pairs just below
        the threshold verified geometrically unless ``verify=False``; with ``ray``, the k-NN graph, the head's
        re-scoring and the verification run on that Ray cluster."""
        options = DedupOptions(k=k, threshold=threshold, precision=precision, labels=labels,
                               min_index_similarity=min_index_similarity, verify=verify, pair_batch=self.batch_size)
        with run_lock(self.index_dir, self.log):
            index, generation, _ = self.current_index()
            if ray is not None:
                return dedup_on_ray(ray, model=self.model, settings=self.model_settings, db=self.db, index=index,
                                    model_key=self.model_key, generation_id=generation, options=options)
            return find_duplicates(model=self.model, db=self.db, index=index, model_key=self.model_key,
                                   generation_id=generation, options=options)

    def dedup_run(self, run_id: int | None = None) -> DedupReport | None:
        """A stored dedup run (the newest unless ``run_id``) as ``dedup`` reported it, without finding
        duplicates again (no model needed); None when there is no such run."""
        return stored_report(self.db, run_id)

    def compare(self, a: ImageSource | int, b: ImageSource | int, *, method: str = "gradcam", effects: bool = True,
                correspondences: bool = True, concepts: bool = True, verify: bool = True,
                sizes: Sequence[tuple[int, int] | None] = (None, None), figure: str | os.PathLike | None = None,
                titles: tuple[str, str] | None = None) -> PairExplanation:
        """Score and explain two images as ``SimilarityModel.compare`` does, geometric verification
        included unless ``verify=False`` (a verified pair is a match whatever its similarity; ~0.16 s);
        each side is an image (path, bytes, PIL image or array) or the id of a catalogue item, read from
        its stored file (decoded once, at the model's input size, for both the head and the verification).

        Correspondence boxes and inlier lines are in the original images' pixels: an item's size is the one
        the catalogue stored; an image's is its entry in ``sizes`` (give it for an image already decoded at
        reduced size), else read from its header. ``figure`` also writes the pair figure there, titled
        ``titles`` (default: each side's file name). Raises ``UnknownItemError`` for an id the catalogue
        lacks and ``ItemImageError`` when an item's file is missing or no longer decodes."""
        sized = correspondences or verify
        (image_a, size_a, name_a), (image_b, size_b, name_b) = (
            self._side(side, size, sized, title)
            for side, size, title in zip((a, b), sizes, ("image A", "image B")))
        return self.model.compare(image_a, image_b, method=method, effects=effects, correspondences=correspondences,
                                  concepts=concepts, verify=verify, sizes=(size_a, size_b) if sized else None,
                                  figure=figure, titles=titles or (name_a, name_b))

    def _side(self, side: ImageSource | int, size: tuple[int, int] | None, sized: bool,
              title: str) -> tuple[ImageSource, tuple[int, int] | None, str]:
        """One side of a comparison: (its pixels or source, its original size when ``sized``, its title:
        the file name where it has one, else ``title``)."""
        if isinstance(side, int):
            item = self._item(side)
            return self._pixels(item, self.input_size), (item.width, item.height), PurePath(item.source).name
        if isinstance(side, (str, os.PathLike)):
            title = PurePath(side).name
        return side, (size or image_size(side)) if sized else None, title

    def item_image(self, item_id: int, *, size: int | None = None) -> np.ndarray:
        """Catalogue item ``item_id``'s image decoded from its stored file (H×W×3 uint8 RGB), no smaller than
        ``size`` on a side where the format allows (default: the model's input size). Raises
        ``UnknownItemError`` for an id the catalogue lacks and ``ItemImageError`` when the file is missing or
        no longer decodes."""
        return self._pixels(self._item(item_id), size or self.input_size)

    def _item(self, item_id: int) -> Item:
        # defers torch and matplotlib: search's error type lives with search
        from indexer.search import UnknownItemError

        with self.db.session() as session:
            item = crud.get_item(session, item_id)
        if item is None:
            raise UnknownItemError(f"no catalogue item {item_id}")
        return item

    @staticmethod
    def _pixels(item: Item, size: int) -> np.ndarray:
        try:
            return load_pixels(read_indexed(item.source, item.sha256), target_size=size)
        except ImageLoadError as exc:
            raise ItemImageError(item.id, exc) from exc

    def extreme_pairs(self, best: int, worst: int = 1, *,
                      origin: str | os.PathLike | None = None) -> tuple[list[ScoredPair], list[ScoredPair]]:
        """The ``best`` most alike pairs of items, by the head, and the ``worst`` least alike: every pair is
        ranked by index similarity (the embeddings) and the head re-scores four times as many at each end
        from the stored descriptions, as search re-ranks its candidates. ``origin`` (a folder or CSV that
        was indexed) keeps only its items.

        Every pair is visited (time and memory grow with the square of the catalogue), which suits a small
        catalogue such as the demo's; ``dedup`` finds the duplicates of a large one."""
        model = self.model
        with self.db.session() as session:
            ids, vectors = self.db.vectors.embeddings(session, self.model_key, int(model.config.embed_dim))
            items = crud.items_by_ids(session, ids.tolist())
            if origin is not None:
                root = os.path.abspath(origin)
                kept = np.array([items[i].origin == root for i in ids.tolist()], dtype=bool)
                ids, vectors = ids[kept], vectors[kept]
            descriptions = self.db.vectors.descriptions(session, ids.tolist(), self.model_key)
        if len(ids) < 2:
            return [], []
        if model.metric == "l2":  # the index's similarity: minus the distance, as faiss_index.search gives it
            squares = (vectors * vectors).sum(axis=1)
            similarities = -np.sqrt(np.maximum(squares[:, None] + squares[None, :] - 2 * vectors @ vectors.T, 0.0))
        else:
            similarities = vectors @ vectors.T
        rows, cols = np.triu_indices(len(ids), k=1)
        order = np.argsort(-similarities[rows, cols], kind="stable")

        def rescored(candidates: np.ndarray, n: int, sign: float) -> list[ScoredPair]:
            a, b = ids[rows[candidates]].tolist(), ids[cols[candidates]].tolist()
            head = model.score_described([descriptions[i] for i in a], [descriptions[i] for i in b])
            ranked = sorted(range(len(candidates)), key=lambda m: (-sign * head[m], m))[:n]
            return [ScoredPair(a[m], b[m], items[a[m]].source, items[b[m]].source,
                               float(similarities[rows[candidates[m]], cols[candidates[m]]]), float(head[m]))
                    for m in ranked]

        return rescored(order[: 4 * best], best, 1.0), rescored(order[::-1][: 4 * worst], worst, -1.0)

    def relative_sources(self, sources: Iterable[str]) -> dict[str, str]:
        """Each item source (an absolute path, as search and index reports give them) as clients may see
        it (``catalogue_path``); the file name of a path the catalogue no longer holds."""
        sources = list(dict.fromkeys(sources))
        with self.db.session() as session:
            ids = crud.item_ids_by_source(session, sources)
            items = crud.items_by_ids(session, ids.values())
        return {source: catalogue_path(source, items[ids[source]].origin) if ids.get(source) in items
                else PurePath(source).name for source in sources}
