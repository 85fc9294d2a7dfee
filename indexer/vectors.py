"""Embeddings and head descriptions in columnar shards, apart from the catalogue database.

Every embedded item has its current row — (item id, embedding as float16, packed head description) — in
one Parquet file (a *shard*) of a folder on any path fsspec reaches: the data directory's ``vectors/`` by
default, or e.g. ``s3://bucket/catalogue/vectors`` (``StorageSettings.vectors_url``). The database keeps
only which shard holds each item's row (``items.shard``), so it stays small however large the catalogue:
items, listings, runs and reviews.

Shards are immutable and written whole before the transaction that points items at them commits (to a
temporary name and renamed on a local disk; one upload is atomic on an object store), so a committed item
always finds its row. A file no item points at (a run killed before its commit, or a shard compacted
away) is deleted by the next index run's ``sweep``, under the run lock. Re-embedding or deleting an item
leaves a dead row behind; ``compaction_plan`` picks the small and the mostly dead shards, which an index
run rewrites into larger ones, sorted by item id in row groups small enough that reading one item's
description reads little else (``_row_groups`` skips the others by their id statistics).

A reader resolves shards in its own database transaction; should a compaction by another process have
deleted one before it is read, the reader resolves again (``_resolved``).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.orm import Session

from indexer import crud

SUFFIX = ".parquet"
ROW_GROUP = 32  # rows read to fetch one item's description (≈ 250 KB with the shipped model's compact descriptions)
COMPACT_BELOW = 8192  # shards with fewer live rows than this are merged into larger ones...
SPARSE_SHARE = 0.5  # ...and so are shards whose live rows fell below this share of their rows
SHARD_ROWS = 65536  # rows per compacted shard
_OPEN_FILES = 64  # shard footers kept open between reads
# Statistics only for the ids the row groups are found by (a binary column's min and max would copy two
# descriptions into the footer for every row group); descriptions are codes and embeddings noise to a
# dictionary or a compressor.
WRITE_OPTIONS = {"row_group_size": ROW_GROUP, "write_statistics": ["item_id"], "use_dictionary": False, "compression": "none"}


@dataclass(frozen=True)
class Rows:
    """Rows of one or more shards, in item id order."""

    ids: np.ndarray  # int64
    embeddings: np.ndarray | None  # float16, one row per id (None when not read)
    descriptions: list[bytes] | None

    def __len__(self) -> int:
        return len(self.ids)


class VectorStore:
    """The shard folder at ``url``: writes shards, reads rows by item id, deletes unreferenced files."""

    def __init__(self, url: str | os.PathLike) -> None:
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self._open: OrderedDict[str, _OpenShard] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VectorStore({self.url!r})"

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    # ------------------------------------------------------------------ files

    def write(self, ids: Sequence[int], embeddings: np.ndarray, descriptions: Sequence[bytes], *, tag: int) -> str:
        """A new shard holding these rows (sorted by id); returns its name. ``tag`` (the catalogue version
        of the writing transaction) orders names by age. The file is complete before the name is returned."""
        order = np.argsort(np.asarray(ids, np.int64), kind="stable")
        ids = np.asarray(ids, np.int64)[order]
        vectors = np.ascontiguousarray(np.asarray(embeddings, np.float16)[order])
        table = pa.table({
            "item_id": pa.array(ids, pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
            "description": pa.array([descriptions[n] for n in order], pa.binary()),
        })
        name = f"{tag:012d}-{uuid.uuid4().hex[:12]}-{len(ids)}{SUFFIX}"
        self.fs.makedirs(self.root, exist_ok=True)
        target = self._path(name)
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            partial = target + ".tmp"
            with open(partial, "wb") as handle:
                pq.write_table(table, handle, **WRITE_OPTIONS)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
        else:
            with self.fs.open(target, "wb") as handle:
                pq.write_table(table, handle, **WRITE_OPTIONS)
        return name

    def names(self) -> list[str]:
        """Every shard file in the folder (and any a killed write left half-written)."""
        if not self.fs.exists(self.root):
            return []
        return sorted(os.path.basename(path.rstrip("/")) for path in self.fs.ls(self.root, detail=False))

    def delete(self, names: Sequence[str]) -> None:
        with self._lock:
            for name in names:
                self._open.pop(name, None)
        for name in names:
            try:
                self.fs.rm(self._path(name))
            except FileNotFoundError:
                pass

    def _file(self, name: str) -> _OpenShard:
        """The open shard, with the lock its reads take: one file object must not seek for two threads at once
        (the API searches from several)."""
        with self._lock:
            found = self._open.get(name)
            if found is not None:
                self._open.move_to_end(name)
                return found
        opened = _OpenShard.of(pq.ParquetFile(self.fs.open(self._path(name), "rb")))
        with self._lock:
            opened = self._open.setdefault(name, opened)
            while len(self._open) > _OPEN_FILES:
                self._open.popitem(last=False)
        return opened

    def read(self, name: str, ids: Sequence[int] | None = None, *, embeddings: bool = True, descriptions: bool = True) -> Rows:
        """The rows of shard ``name`` for ``ids`` (all its rows when None), in id order; ids it lacks are left out."""
        opened = self._file(name)
        wanted = None if ids is None else np.unique(np.asarray(ids, np.int64))
        groups = opened.row_groups(wanted)
        columns = ["item_id"] + (["embedding"] if embeddings else []) + (["description"] if descriptions else [])
        shard = opened.file
        with opened.lock:
            table = shard.read_row_groups(groups, columns=columns) if groups else shard.schema_arrow.empty_table().select(columns)
        found = table.column("item_id").to_numpy()
        keep = np.ones(len(found), bool) if wanted is None else np.isin(found, wanted)
        rows = np.flatnonzero(keep)
        vectors = None
        if embeddings:
            column = table.column("embedding").combine_chunks()
            width = column.type.list_size
            vectors = column.values.to_numpy(zero_copy_only=False).reshape(-1, width)[rows] if len(found) else np.zeros((0, width), np.float16)
        blobs = None
        if descriptions:
            column = table.column("description")
            blobs = [column[int(n)].as_py() for n in rows]
        return Rows(found[rows], vectors, blobs)

    # ------------------------------------------------------------------ composed with the database

    def descriptions(self, session: Session, ids: Sequence[int], model_key: str) -> dict[int, bytes]:
        """item id → the head description stored by ``model_key``; items not embedded by it are left out."""
        found: dict[int, bytes] = {}
        for rows in self._resolved(lambda: crud.item_shards(session, ids, model_key), embeddings=False):
            found.update(zip(rows.ids.tolist(), rows.descriptions))
        return found

    def rows(self, session: Session, ids: Sequence[int], model_key: str) -> dict[int, tuple[np.ndarray, bytes]]:
        """item id → (float16 embedding, description) stored by ``model_key``; others left out."""
        found: dict[int, tuple[np.ndarray, bytes]] = {}
        for rows in self._resolved(lambda: crud.item_shards(session, ids, model_key)):
            found.update(zip(rows.ids.tolist(), zip(rows.embeddings, rows.descriptions)))
        return found

    def iter_embeddings(self, session: Session, model_key: str, ids: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) of the items embedded by ``model_key`` (all, or only ``ids``), a shard at a time."""
        for rows in self._resolved(lambda: crud.item_shards(session, ids, model_key), descriptions=False):
            if len(rows):
                yield rows.ids, rows.embeddings.astype(np.float32)

    def embeddings(self, session: Session, model_key: str, dim: int, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) of the items embedded by ``model_key`` (all, or only ``ids``), sorted by id."""
        parts = list(self.iter_embeddings(session, model_key, ids))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        found, vectors = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        order = np.argsort(found, kind="stable")
        return found[order], vectors[order]

    def _resolved(self, resolve: Callable[[], Iterator[tuple[str, list[int]]]], *, embeddings: bool = True,
                  descriptions: bool = True) -> Iterator[Rows]:
        """The rows of the items ``resolve`` lists shard by shard. Should a compaction delete a shard after it
        was resolved, everything is resolved once more and only the items not yet read are read."""
        done: list[np.ndarray] = []
        for attempt in range(2):
            seen = np.concatenate(done) if done else np.zeros(0, np.int64)
            try:
                for name, ids in resolve():
                    wanted = np.setdiff1d(np.asarray(ids, np.int64), seen) if len(seen) else ids
                    if len(wanted):
                        rows = self.read(name, wanted, embeddings=embeddings, descriptions=descriptions)
                        done.append(rows.ids)
                        yield rows
                return
            except FileNotFoundError:
                if attempt:
                    raise

    # ------------------------------------------------------------------ upkeep (under the index run's lock)

    def sweep(self, referenced: set[str]) -> int:
        """Delete the files no item points at; returns how many."""
        orphans = [name for name in self.names() if name not in referenced]
        self.delete(orphans)
        return len(orphans)


def rows_in(name: str) -> int:
    """The rows a shard was written with (its name says so)."""
    return int(name.removesuffix(SUFFIX).rsplit("-", 1)[1])


def compaction_plan(live: Mapping[str, int]) -> list[str]:
    """The shards worth rewriting, from their live row counts: the small ones (when there are two or more
    to merge) and the mostly dead ones."""
    sparse = [name for name, n in live.items() if n < SPARSE_SHARE * rows_in(name)]
    small = [name for name, n in live.items() if n < COMPACT_BELOW and name not in sparse]
    if len(small) < 2:
        small = []
    return sorted(sparse + small)


@dataclass
class _OpenShard:
    """An open shard, the lock its reads take, and the first and last item id of each of its row groups
    (``write`` sorts a shard's rows by id), read from the footer once: finding the row groups of a few ids
    is then a binary search, not a walk over every row group's statistics. None: a file without them, whose
    every row group is read."""

    file: pq.ParquetFile
    lock: threading.Lock
    first_ids: np.ndarray | None
    last_ids: np.ndarray | None

    @classmethod
    def of(cls, file: pq.ParquetFile) -> _OpenShard:
        metadata = file.metadata
        statistics = [metadata.row_group(g).column(0).statistics for g in range(metadata.num_row_groups)]
        if not all(s is not None and s.has_min_max for s in statistics):
            return cls(file, threading.Lock(), None, None)
        return cls(file, threading.Lock(), np.array([s.min for s in statistics], np.int64),
                   np.array([s.max for s in statistics], np.int64))

    def row_groups(self, wanted: np.ndarray | None) -> list[int]:
        """The row groups that hold any of ``wanted`` (sorted, unique) ids; all of them when None."""
        if wanted is not None and not len(wanted):
            return []
        if wanted is None or self.first_ids is None:
            return list(range(self.file.metadata.num_row_groups))
        groups = np.searchsorted(self.first_ids, wanted, side="right") - 1
        inside = groups >= 0
        inside[inside] = wanted[inside] <= self.last_ids[groups[inside]]
        return np.unique(groups[inside]).tolist()
