"""FAISS indexes of item embeddings: choosing, building, updating, saving atomically, loading.

Every index is wrapped in ``IndexIDMap2`` whose ids are the database item ids. The kind of index
is chosen by catalogue size unless a FAISS ``index_factory`` string names it:

* up to ``EXACT_LIMIT`` vectors: ``Flat`` — exact inner product (cosine on unit vectors);
* up to ``HNSW_LIMIT``: ``HNSW32`` — a graph index, no training, ~99% recall at ``efSearch`` 128;
* above: ``IVF<nlist>,PQ<m>`` — compressed, trained on a sample of at most ``TRAIN_SAMPLE`` vectors.

Files are written to a temporary name, fsynced, renamed over the final name and the folder fsynced,
so a reader (or a crash) only ever sees a complete file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import faiss
import numpy as np

EXACT_LIMIT = 100_000
HNSW_LIMIT = 1_000_000
TRAIN_SAMPLE = 200_000
EF_SEARCH = 128
# The dedup k-NN graph queries every item: a shallower search keeps 1M items within minutes at
# ~0.99 recall of the true neighbours (benchmarks/scale.py), and the head re-scores what it finds.
GRAPH_EF_SEARCH = 32
NPROBE = 16


def faiss_metric(metric: str) -> int:
    """The model's metric as FAISS's: cosine → inner product (embeddings are unit length), l2 → L2."""
    if metric == "cosine":
        return faiss.METRIC_INNER_PRODUCT
    if metric == "l2":
        return faiss.METRIC_L2
    raise ValueError(f"unknown metric {metric!r}")


def choose_factory(n: int, dim: int) -> str:
    """The index for a catalogue of ``n`` vectors of ``dim`` dimensions (without the IDMap2 wrapper)."""
    if n <= EXACT_LIMIT:
        return "Flat"
    if n <= HNSW_LIMIT:
        return "HNSW32"
    if dim < 16:
        return "HNSW32"  # product quantisation is pointless on tiny vectors
    nlist = 1 << int(round(math.log2(4 * math.sqrt(n))))
    m = max(d for d in range(1, dim // 8 + 1) if dim % d == 0)  # ~8 dimensions per 8-bit code
    return f"IVF{nlist},PQ{m}"


def _full_factory(factory: str) -> str:
    factory = factory.strip()
    return factory if factory.upper().startswith("IDMAP") else f"IDMap2,{factory}"


def new_index(dim: int, metric: str, factory: str) -> faiss.Index:
    """An empty index; raises ValueError for a factory string FAISS does not understand."""
    try:
        index = faiss.index_factory(dim, _full_factory(factory), faiss_metric(metric))
    except RuntimeError as exc:
        raise ValueError(f"invalid FAISS index factory {factory!r}: {str(exc).strip().splitlines()[-1]}") from exc
    if not isinstance(index, faiss.IndexIDMap2):
        raise ValueError(f"index factory {factory!r} must give an IndexIDMap2 (use 'IDMap2,...' or no IDMap prefix)")
    return index


def build_index(vectors: np.ndarray, ids: np.ndarray, metric: str, factory: str, *, seed: int = 0) -> faiss.Index:
    """Build an index over ``vectors`` (n×d float32) with item ``ids`` (n int64), training it if needed."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"need n×d vectors and n ids, got {vectors.shape} and {ids.shape}")
    index = new_index(vectors.shape[1], metric, factory)
    if not index.is_trained:
        if len(vectors) == 0:
            raise ValueError(f"index factory {factory!r} needs training vectors; the catalogue is empty")
        rng = np.random.default_rng(seed)
        sample = vectors if len(vectors) <= TRAIN_SAMPLE else vectors[np.sort(rng.choice(len(vectors), TRAIN_SAMPLE, replace=False))]
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise ValueError(f"cannot train index {factory!r} on {len(sample)} vectors: {str(exc).strip().splitlines()[-1]}") from exc
    add(index, vectors, ids)
    set_search_parameters(index)
    return index


def add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, chunk: int = 65536) -> None:
    for start in range(0, len(ids), chunk):
        index.add_with_ids(
            np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32),
            np.ascontiguousarray(ids[start : start + chunk], dtype=np.int64),
        )


def remove(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove ids; raises RuntimeError for index kinds that cannot (HNSW)."""
    if len(ids) == 0:
        return 0
    return int(index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))


def ids_of(index: faiss.Index) -> np.ndarray:
    """The item ids an IndexIDMap2 holds."""
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def set_search_parameters(index: faiss.Index, *, nprobe: int = NPROBE, ef_search: int = EF_SEARCH) -> None:
    """Recall-oriented defaults for approximate indexes (no-ops for exact ones)."""
    space = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            pass  # this index kind has no such parameter


def search(index: faiss.Index, queries: np.ndarray, k: int, *, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each q×k; missing neighbours have id -1. Scores are similarities:
    inner products for cosine indexes, negated distances for L2 ones (higher = more alike).
    ``ef_search`` overrides an HNSW index's search depth for this call only (thread-safe: the index
    itself is not changed); other index kinds ignore it."""
    k = max(1, min(int(k), max(index.ntotal, 1)))
    params = None
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if ef_search is not None and isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(efSearch=max(int(ef_search), k))
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
    if index.metric_type == faiss.METRIC_L2:
        scores = -np.sqrt(np.maximum(scores, 0.0))
    return scores, ids


# ------------------------------------------------------------------------------------ files


def save_index(index: faiss.Index, path: str | os.PathLike) -> Path:
    """Write ``index`` to ``path`` atomically: temp file, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_index(path: str | os.PathLike) -> faiss.Index:
    index = faiss.read_index(str(path))
    if not isinstance(index, faiss.IndexIDMap2):
        index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexIDMap2):
        raise ValueError(f"{path}: not a whymatch index (expected IndexIDMap2, got {type(index).__name__})")
    set_search_parameters(index)
    return index


class IndexStore:
    """The folder of index files: ``catalogue-<generation>.faiss``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    @staticmethod
    def filename(generation: int) -> str:
        return f"catalogue-{generation:06d}.faiss"

    def path(self, filename: str) -> Path:
        return self.directory / filename

    def save(self, index: faiss.Index, filename: str) -> Path:
        return save_index(index, self.path(filename))

    def load(self, filename: str) -> faiss.Index:
        return load_index(self.path(filename))

    def exists(self, filename: str) -> bool:
        return self.path(filename).is_file()

    def cleanup(self, keep: set[str]) -> list[str]:
        """Delete index files not in ``keep`` and temporary files left by killed runs."""
        removed = []
        if not self.directory.is_dir():
            return removed
        for path in self.directory.iterdir():
            stale_index = path.name.startswith("catalogue-") and path.suffix == ".faiss" and path.name not in keep
            stale_tmp = path.name.startswith(".catalogue-") and path.name.endswith(".tmp")
            if stale_index or stale_tmp:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed
