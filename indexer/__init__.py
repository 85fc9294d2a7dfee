"""whymatch's indexer: catalogue → FAISS + SQL metadata, query-by-image search, duplicate detection.

Uses only the engine's public API (``engine.load_model``, ``SimilarityModel`` methods,
``engine.images``, ``engine.eval.metrics``, ``engine.explain.figures``). Entry point: ``Catalogue``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from indexer.dedup import DedupOptions, DedupReport
    from indexer.distributed import RayCluster
    from indexer.indexing import IndexOptions, IndexReport
    from indexer.search import Match, SearchOptions, SearchResult, UnknownItemError
    from indexer.model import CatalogueModel
    from indexer.service import Catalogue

# Exports load on first use, so that the ``whymatch`` command starts without importing torch and FAISS.
_EXPORTS = {
    "DedupOptions": "indexer.dedup",
    "DedupReport": "indexer.dedup",
    "RayCluster": "indexer.distributed",
    "IndexOptions": "indexer.indexing",
    "IndexReport": "indexer.indexing",
    "Match": "indexer.search",
    "SearchOptions": "indexer.search",
    "SearchResult": "indexer.search",
    "UnknownItemError": "indexer.search",
    "Catalogue": "indexer.service",
    "CatalogueModel": "indexer.model",
}

__all__ = ["Catalogue", "CatalogueModel", "DedupOptions", "DedupReport", "IndexOptions", "IndexReport", "Match", "RayCluster",
           "SearchOptions", "SearchResult", "UnknownItemError"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
