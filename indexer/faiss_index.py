"""FAISS indexes of item embeddings: choosing, building, updating, saving atomically, loading.

Every index is wrapped in ``IndexIDMap2`` whose ids are the database item ids. The kind of index
is chosen by catalogue size unless a FAISS ``index_factory`` string names it:

* up to ``EXACT_LIMIT`` vectors: ``Flat`` — exact inner product (cosine on unit vectors);
* up to ``HNSW_LIMIT``: ``HNSW32`` — a graph index, no training, ~99% recall at ``efSearch`` 128;
* above: ``IVF<nlist>_HNSW32,PQ<m>`` — compressed, trained on a sample of at most ``TRAIN_SAMPLE`` vectors,
  and kept on disk (below).

Files are written to a temporary name, fsynced, renamed over the final name and the folder fsynced,
so a reader (or a crash) only ever sees a complete file.

Past what one machine's memory holds comfortably (10^7–10^9 vectors) the IVF-PQ index is built out of
core (``build_ondisk``): trained on a sample, filled shard by shard (each shard a file, so shards can be
built by separate processes), merged into one inverted-list file that serving processes memory-map
(``load_ondisk``), and its shortlist re-ranked by the exact vectors, kept memory-mapped next to it
(``OnDiskIndex``, reading them with ``pread``). Those IVF lists hold row numbers of the vectors file; an ids file maps rows to item ids.
A catalogue of more than ``ONDISK_ABOVE`` vectors whose index is IVF (the automatic choice there, or a
factory string naming one) gets such an index (``wants_ondisk``); ``IndexStore.load``, ``search`` and
``ids_of`` take either kind.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

EXACT_LIMIT = 100_000
HNSW_LIMIT = 1_000_000
TRAIN_SAMPLE = 200_000
EF_SEARCH = 128
# The dedup k-NN graph queries every item: a shallower search keeps 1M items within minutes at
# ~0.99 recall of the true neighbours (benchmarks/scale.py), and the head re-scores what it finds.
GRAPH_EF_SEARCH = 32
NPROBE = 16
# On-disk IVF-PQ search: the probes and the shortlist re-ranked by exact vectors (benchmarks/scale.py
# tunes them for recall@10 after re-ranking against exact search).
ONDISK_NPROBE = 64
RERANK_FACTOR = 30
# Catalogues above this many vectors keep an IVF index on disk, memory-mapped (``wants_ondisk``).
ONDISK_ABOVE = HNSW_LIMIT


def faiss_metric(metric: str) -> int:
    """The model's metric as FAISS's: cosine → inner product (embeddings are unit length), l2 → L2."""
    if metric == "cosine":
        return faiss.METRIC_INNER_PRODUCT
    if metric == "l2":
        return faiss.METRIC_L2
    raise ValueError(f"unknown metric {metric!r}")


def choose_factory(n: int, dim: int) -> str:
    """The index for a catalogue of ``n`` vectors of ``dim`` dimensions (without the IDMap2 wrapper).

    Above ``HNSW_LIMIT`` an HNSW graph holds every full vector plus its links in memory and its build
    grows faster than linearly, so tens of millions of vectors no longer fit one serving machine's RAM
    nor a build window. IVF-PQ keeps a few dozen bytes of code per vector, in inverted lists that can
    live on disk and be memory-mapped, and its recall loss is won back by re-ranking a shortlist with
    the exact vectors. ``nlist`` ~ 4·√n keeps both the coarse search and the lists scanned per probe
    small; the coarse quantizer is itself an HNSW graph over the centroids, so assigning each vector
    to its list (at add and at search) does not cost a pass over all centroids. PQ codes take ~8
    dimensions per byte.
    """
    if n <= EXACT_LIMIT:
        return "Flat"
    if n <= HNSW_LIMIT:
        return "HNSW32"
    if dim < 16:
        return "HNSW32"  # product quantisation is pointless on tiny vectors
    nlist = 1 << int(round(math.log2(4 * math.sqrt(n))))
    m = max(d for d in range(1, dim // 8 + 1) if dim % d == 0)  # ~8 dimensions per 8-bit code
    return f"IVF{nlist}_HNSW32,PQ{m}"


def wants_ondisk(n: int, dim: int, factory: str) -> bool:
    """Whether a catalogue of ``n`` vectors keeps its index (``factory``) on disk: above ``ONDISK_ABOVE``,
    when the factory names an IVF index (the only kind whose lists FAISS serves memory-mapped)."""
    if n <= ONDISK_ABOVE:
        return False
    try:
        faiss.extract_index_ivf(faiss.index_factory(dim, factory.strip()))
    except RuntimeError:
        return False
    return True


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


def remove(index: faiss.Index | OnDiskIndex, ids: np.ndarray) -> int:
    """Remove ids; raises RuntimeError for index kinds that cannot (HNSW, an on-disk index)."""
    if len(ids) == 0:
        return 0
    if isinstance(index, OnDiskIndex):
        raise RuntimeError("an on-disk index is rebuilt, not updated")
    return int(index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))


def ids_of(index: faiss.Index | OnDiskIndex) -> np.ndarray:
    """The item ids an IndexIDMap2 or an on-disk index holds."""
    if isinstance(index, OnDiskIndex):
        return np.asarray(index.ids, dtype=np.int64)
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def set_search_parameters(index: faiss.Index, *, nprobe: int = NPROBE, ef_search: int = EF_SEARCH) -> None:
    """Recall-oriented defaults for approximate indexes (no-ops for exact ones)."""
    space = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            pass  # this index kind has no such parameter


def search(index: faiss.Index | OnDiskIndex, queries: np.ndarray, k: int, *,
           ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each q×k; missing neighbours have id -1. Scores are similarities:
    inner products for cosine indexes, negated distances for L2 ones (higher = more alike).
    ``ef_search`` overrides an HNSW index's search depth for this call only (thread-safe: the index
    itself is not changed); other index kinds ignore it. An on-disk index searches at its defaults
    (``OnDiskIndex.search``)."""
    if isinstance(index, OnDiskIndex):
        return index.search(queries, k)
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


# What an ``IndexStore`` writes for one generation: the index file and, for an on-disk index, its lists,
# vectors, ids and shards (``OnDiskFiles``); cleanup deletes nothing else.
_INDEX_FILE = re.compile(r"catalogue-\d+\.(faiss|ivfdata|vectors\.npy|ids\.npy|shards)")


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

    def load(self, filename: str) -> faiss.Index | OnDiskIndex:
        """The index saved as ``filename``: in memory, or memory-mapped when it is an on-disk one."""
        files = self.ondisk(filename)
        return load_ondisk(files) if files.ivfdata.is_file() else load_index(self.path(filename))

    def exists(self, filename: str) -> bool:
        return self.path(filename).is_file()

    def ondisk(self, filename: str) -> OnDiskFiles:
        """The files of an on-disk index whose header is ``filename``, all in this folder."""
        return OnDiskFiles(self.path(filename))

    def cleanup(self, keep: set[str]) -> list[str]:
        """Delete index files not in ``keep`` (with the lists, vectors, ids and shards of on-disk ones)
        and temporary files left by killed runs."""
        removed = []
        if not self.directory.is_dir():
            return removed
        for path in self.directory.iterdir():
            stem = path.name.split(".", 1)[0]
            stale_index = bool(_INDEX_FILE.fullmatch(path.name)) and f"{stem}.faiss" not in keep
            stale_tmp = path.name.startswith(".catalogue-") and path.name.endswith(".tmp")
            if stale_index or stale_tmp:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed


# ------------------------------------------------------------------------------------ on-disk IVF-PQ


@dataclass(frozen=True)
class OnDiskFiles:
    """Where one on-disk index lives, all in one folder: ``<stem>.faiss`` (the trained quantizers and
    the directory of the lists), ``<stem>.ivfdata`` (the inverted lists), ``<stem>.vectors.npy`` (the
    exact vectors, one row each), ``<stem>.ids.npy`` (the item id of each row) and, while it is built,
    ``<stem>.shards/``. The header names its list file relative to its own folder, so the folder can move."""

    index: Path

    @property
    def stem(self) -> str:
        return self.index.name.removesuffix(".faiss")

    @property
    def ivfdata(self) -> Path:
        return self.index.with_name(f"{self.stem}.ivfdata")

    @property
    def vectors(self) -> Path:
        return self.index.with_name(f"{self.stem}.vectors.npy")

    @property
    def ids(self) -> Path:
        return self.index.with_name(f"{self.stem}.ids.npy")

    @property
    def shards(self) -> Path:
        return self.index.with_name(f"{self.stem}.shards")


def create_vectors(files: OnDiskFiles, n: int, dim: int, dtype: type[np.floating] = np.float16) -> np.memmap:
    """A writable memory-mapped ``n``×``dim`` array at ``files.vectors``, to be filled in chunks so that
    the catalogue's vectors never have to be in memory at once. float16 halves the disk and page cache
    that re-ranking reads, and moves inner products of unit vectors far less than PQ does."""
    files.vectors.parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(files.vectors, mode="w+", dtype=dtype, shape=(n, dim))


def write_ids(files: OnDiskFiles, ids: np.ndarray) -> Path:
    """The item id of each row of ``files.vectors``."""
    np.save(files.ids, np.ascontiguousarray(ids, dtype=np.int64))
    return files.ids


def train_ivfpq(sample: np.ndarray, metric: str, factory: str) -> faiss.Index:
    """A trained, empty IVF index (``factory``, e.g. ``IVF16384_HNSW32,PQ32`` or ``OPQ32,IVF…``) for a
    template of shards. It has no IDMap wrapper: its lists store the row numbers themselves, which is
    what lets shards be merged list by list."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if factory.strip().upper().startswith("IDMAP"):
        raise ValueError(f"on-disk index factory {factory!r} must not have an IDMap wrapper: its lists hold row numbers")
    try:
        index = faiss.index_factory(sample.shape[1], factory.strip(), faiss_metric(metric))
        faiss.extract_index_ivf(index)
    except RuntimeError as exc:
        raise ValueError(f"on-disk index factory {factory!r} must give an IVF index: {str(exc).strip().splitlines()[-1]}") from exc
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise ValueError(f"cannot train index {factory!r} on {len(sample)} vectors: {str(exc).strip().splitlines()[-1]}") from exc
    return index


def add_shard(template: Path, vectors: np.ndarray, first_row: int, path: Path, chunk: int = 65536) -> Path:
    """Fill a copy of the trained, empty index in ``template`` with ``vectors`` as rows ``first_row``…
    and save it to ``path``. Shards depend on nothing but the template, so separate processes or
    machines can build them."""
    index = faiss.read_index(str(template))
    for start in range(0, len(vectors), chunk):
        block = np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32)
        index.add_with_ids(block, np.arange(first_row + start, first_row + start + len(block), dtype=np.int64))
    return save_index(index, path)


def merge_shards(template: Path, shards: list[Path], files: OnDiskFiles) -> None:
    """Merge the shards' inverted lists into ``files.ivfdata`` (``merge_ondisk``, which memory-maps the
    shards rather than loading them) and write the header ``files.index`` last: a reader that finds the
    header finds complete lists."""
    index = faiss.read_index(str(template))
    files.ivfdata.unlink(missing_ok=True)
    merge_ondisk(index, [str(path) for path in shards], str(files.ivfdata))
    fd = os.open(files.ivfdata, os.O_RDONLY)
    try:
        os.fsync(fd)  # the lists were written through a shared mapping, which is this file's page cache
    finally:
        os.close(fd)
    save_index(index, files.index)


def build_ondisk(files: OnDiskFiles, metric: str, factory: str, *, train_size: int = TRAIN_SAMPLE,
                 shard_size: int = 1_000_000, seed: int = 0) -> dict[str, float]:
    """Build the on-disk index of the vectors already in ``files.vectors``: train on a random sample of
    at most ``train_size``, add shards of ``shard_size`` rows, merge them and delete them. Returns the
    seconds each stage took (``train``, ``add``, ``merge``)."""
    vectors = np.load(files.vectors, mmap_mode="r")
    n = len(vectors)
    if n == 0:
        raise ValueError(f"index factory {factory!r} needs training vectors; {files.vectors} is empty")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    rows = np.arange(n) if n <= train_size else np.sort(np.random.default_rng(seed).choice(n, train_size, replace=False))
    index = train_ivfpq(vectors[rows], metric, factory)
    shutil.rmtree(files.shards, ignore_errors=True)
    files.shards.mkdir(parents=True)
    template = save_index(index, files.shards / "trained.faiss")
    seconds["train"] = time.perf_counter() - start

    start = time.perf_counter()
    shards = [add_shard(template, vectors[lo : lo + shard_size], lo, files.shards / f"shard-{number:05d}.faiss")
              for number, lo in enumerate(range(0, n, shard_size))]
    seconds["add"] = time.perf_counter() - start

    start = time.perf_counter()
    merge_shards(template, shards, files)
    shutil.rmtree(files.shards)
    seconds["merge"] = time.perf_counter() - start
    return seconds


def load_ondisk(files: OnDiskFiles) -> OnDiskIndex:
    """The on-disk index, its lists memory-mapped: a serving process holds in memory the quantizers, the
    ids and the list pages its searches touch, which the kernel can drop again; re-ranking reads the exact
    vectors of each shortlist from their file (``RowReader``). The lists are mapped by
    ``OnDiskInvertedLists`` itself, found next to the header (``IO_FLAG_ONDISK_SAME_DIR``); adding
    ``IO_FLAG_MMAP`` to that makes FAISS crash on search."""
    index = faiss.read_index(str(files.index), faiss.IO_FLAG_ONDISK_SAME_DIR)
    vectors, ids = RowReader(files.vectors), np.load(files.ids, mmap_mode="r")
    if not (index.ntotal == len(vectors) == len(ids)):
        raise ValueError(f"{files.index}: {index.ntotal} listed vectors, {len(vectors)} exact vectors, {len(ids)} ids")
    return OnDiskIndex(index, vectors, ids, files)


class RowReader:
    """Rows of a 2-d ``.npy`` file read on demand with ``pread``, one call per row: a shortlist's few scattered
    rows cost a few microseconds each and never become the process's memory. A memory map of the file would
    do the same reads but count every page it touches (and the kernel maps neighbouring cached pages with
    each fault) in the process's resident set, which grows towards the file's size as lookups go on."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, fortran_order, self.dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran_order or len(self.shape) != 2:
            raise ValueError(f"{path}: expected a C-ordered 2-d array")
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        buffer = memoryview(out).cast("B")
        for n, row in enumerate(rows.tolist()):
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"row {row} of {self.shape[0]}")
            got = os.preadv(self._fd, [buffer[n * self.row_bytes : (n + 1) * self.row_bytes]], self.offset + row * self.row_bytes)
            if got != self.row_bytes:
                raise OSError(f"short read of row {row}")
        return out

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


class OnDiskIndex:
    """An IVF index over row numbers, the exact vectors of those rows and the item id of each row, and
    the files they were mapped from (``files``: other processes, e.g. Ray tasks, map them too)."""

    def __init__(self, index: faiss.Index, vectors: RowReader | np.ndarray, ids: np.ndarray, files: OnDiskFiles | None = None) -> None:
        self.index, self.vectors, self.ids, self.files = index, vectors, ids, files
        self.metric_type = index.metric_type

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def d(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int, *, nprobe: int = ONDISK_NPROBE,
               rerank_factor: int = RERANK_FACTOR) -> tuple[np.ndarray, np.ndarray]:
        """(scores, item ids), each q×k, best first; missing neighbours have id -1. The IVF-PQ search
        gives a shortlist of ``rerank_factor``·k rows from ``nprobe`` lists, ranked by compressed codes;
        the exact vectors then order it (scores as ``search`` gives them)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(int(k), max(self.ntotal, 1)))
        shortlist = min(k * max(int(rerank_factor), 1), max(self.ntotal, 1))
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(self.index).quantizer)
        quantizer_params = faiss.SearchParametersHNSW(efSearch=2 * nprobe) if isinstance(quantizer, faiss.IndexHNSW) else None
        params = faiss.SearchParametersIVF(nprobe=int(nprobe), quantizer_params=quantizer_params)
        rows = self.index.search(queries, shortlist, params=params)[1]
        scores, rows = rerank(self.vectors, queries, rows, k, self.metric_type)
        return scores, np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)


CatalogueIndex = faiss.Index | OnDiskIndex
"""A catalogue's index: in memory, or memory-mapped from disk (``wants_ondisk``)."""


def rerank(vectors: RowReader | np.ndarray, queries: np.ndarray, rows: np.ndarray, k: int, metric_type: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's shortlist ``rows`` (q×k', -1 = none) by exact similarity to
    ``vectors[row]``: (scores, rows), each q×k, best first. Scores are inner products, or negated L2
    distances for ``METRIC_L2``."""
    valid = rows >= 0
    unique, inverse = np.unique(rows[valid], return_inverse=True)  # sorted, so the file is read in order
    exact = np.zeros(rows.shape + (vectors.shape[1],), np.float32)
    exact[valid] = np.asarray(vectors[unique], dtype=np.float32)[inverse]
    if metric_type == faiss.METRIC_L2:
        scores = -np.sqrt(np.square(exact - queries[:, None, :]).sum(axis=2))
    else:
        scores = np.matmul(exact, queries[:, :, None])[:, :, 0]
    scores[~valid] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores, top_rows = np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
    top_rows[~np.isfinite(top_scores)] = -1
    return top_scores, top_rows
