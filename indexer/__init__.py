"""whymatch's indexer: catalogue → FAISS + SQL metadata, query-by-image search, duplicate detection.

Uses only the engine's public API (``engine.load_model``, ``SimilarityModel`` methods,
``engine.images``, ``engine.metrics``, ``engine.figures``). Entry point: ``Catalogue``.
"""

from indexer.dedup import DedupOptions, DedupReport
from indexer.indexing import IndexOptions, IndexReport
from indexer.search import Match, SearchResult
from indexer.service import Catalogue

__all__ = ["Catalogue", "DedupOptions", "DedupReport", "IndexOptions", "IndexReport", "Match", "SearchResult"]
