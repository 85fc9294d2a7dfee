"""One indexing run: scan → diff → embed new/changed files in batches → save a FAISS generation.

Crash safety: the database is the source of truth. Every batch of embeddings is written to a new vector
shard (``indexer.vectors``) and then committed in one transaction that points its items at that shard
(with the file's sha256, size and mtime), so a run killed at any moment (SIGKILL included) leaves items
that are either fully recorded or not at all, and at worst a shard no item points at, which the next run
deletes; the next run's diff picks up exactly the files still to do. At the end of a run the small and
the mostly dead shards are compacted into larger ones (``_compact``), crash-safe the same way. The FAISS file is derived data: each one belongs to an index
generation row that records the catalogue version it was built from; it is written to a temporary
name, fsynced and renamed, and the row is marked complete only afterwards. A run that finds the
newest complete generation behind the catalogue updates or rebuilds the index from the embeddings
in the database. Runs on one data directory are serialised by a lock file (``flock``, released by
the kernel when a process dies).

Search and dedup re-score from the head description stored with each embedding. A model with a
description codec (compact descriptions, ``engine.nn.compact``) has its own model key; a run with it
converts the items its weights described as float16 projections (a catalogue indexed before the codec)
from those projections, without reading their files, and re-keys them, in committed batches like the
embeddings.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Container, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from engine.errors import ImageLoadError
from engine.images import DEFAULT_MAX_PIXELS, image_size, load_pixels
from indexer import crud
from indexer import faiss_index as fx
from indexer.vectors import SHARD_ROWS, Rows, compaction_plan
from indexer.catalogue import Diff, Skipped, Work, diff, read_file, scan
from indexer.db import Database
from indexer.model import CatalogueModel, Picture
from indexer.models import IndexGeneration, Item


@dataclass
class IndexOptions:
    rebuild: bool = False  # re-read, re-hash and re-embed every file of this origin; build the FAISS index afresh
    index_factory: str | None = None  # FAISS index_factory string; None = chosen by catalogue size
    batch_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused (decompression bombs)
    listing_regex: str | None = None  # listing key from the relative path (folders); see catalogue.listing_from_path
    progress: bool | None = None  # progress bar on stderr; None = only when stderr is a terminal


@dataclass
class IndexReport:
    """What a run did. Every file scanned is counted once: ``added``, ``updated``, ``touched``,
    ``unchanged`` or ``skipped`` (they sum to ``scanned``); the other counts are of items, or of how the
    added and updated ones were embedded."""

    source: str
    scanned: int = 0
    added: int = 0
    updated: int = 0  # existing items re-embedded (bytes changed, or no embedding by this model)
    touched: int = 0  # metadata only: same bytes with a new mtime, or a new listing key
    unchanged: int = 0
    removed: int = 0  # items deleted: file gone, or now unreadable
    exact_duplicates: int = 0  # of the added and updated: embeddings copied from a byte-identical file (no network run)
    embedded: int = 0  # images that went through the network
    recoded: int = 0  # items described as float16 projections by this model's weights, converted to its compact descriptions
    shards_swept: int = 0  # vector shard files no item pointed at (left by a killed run or compaction), deleted
    shards_compacted: int = 0  # small or mostly dead vector shards rewritten into larger ones
    embed_seconds: float = 0.0  # in the network; on a Ray cluster, the pipeline's wall time (``indexer.distributed``)
    skipped: list[Skipped] = field(default_factory=list)
    generation: int | None = None
    index_factory: str | None = None
    index_action: str = ""  # "unchanged", "updated" or "rebuilt"
    ntotal: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["skipped"] = [{"source": s.source, "reason": s.reason} for s in self.skipped]
        data["images_per_second"] = round(self.images_per_second, 2)
        return data

    def summary(self) -> str:
        upkeep = f"; converted {self.recoded} stored descriptions to compact ones" if self.recoded else ""
        if self.shards_compacted or self.shards_swept:
            upkeep += f"; vector shards: {self.shards_compacted} compacted, {self.shards_swept} left over deleted"
        lines = [
            f"{self.source}: {self.scanned} files in {self.seconds:.1f} s — {self.added} added, {self.updated} re-embedded, "
            f"{self.touched} metadata-only, {self.unchanged} unchanged, {len(self.skipped)} skipped",
            f"embedded {self.embedded} images ({self.images_per_second:.1f} images/s), {self.exact_duplicates} exact duplicates "
            f"copied without embedding; {self.removed} items removed{upkeep}",
            f"FAISS {self.index_factory} index {self.index_action}: {self.ntotal} vectors (generation {self.generation})",
        ]
        return "\n".join(lines)


def model_fingerprint(model: CatalogueModel, description_format: str | None = None) -> str:
    """sha256 of the model's config, weights and description layout (its codec's included): embeddings
    and stored descriptions by another model are never mixed in. Provenance and decision thresholds
    change neither, so re-placing a threshold does not re-embed a catalogue. ``description_format``: the
    key the same weights have with descriptions of that layout instead (``_recode_backlog``)."""
    digest = hashlib.sha256((description_format or model.description_format).encode())
    config = {k: v for k, v in asdict(model.config).items() if k not in ("provenance", "threshold", "duplicate_threshold")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def run_lock(directory: Path, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """An exclusive lock on the data directory's index folder for the whole run."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log:
                log(f"waiting for another whymatch run holding {directory / '.lock'}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------ reading files


@dataclass
class Prepared:
    """One file to do, read and hashed (and decoded when its bytes need the network)."""

    work: Work
    kind: str  # "same" (bytes unchanged), "copy" (known sha), "embed", "broken"
    sha256: str = ""
    size: int = 0
    mtime_ns: int = 0
    image: Picture | None = None
    width: int = 0
    height: int = 0
    reason: str = ""


def prepare(work: Work, known: Container[str], input_size: int, max_pixels: int) -> Prepared:
    """Read, hash and (unless ``known`` holds its sha256) decode one file. Runs in a worker thread, or a Ray actor."""
    try:
        data, st = read_file(work.entry.source)
    except ImageLoadError as exc:
        return Prepared(work, "broken", reason=str(exc))
    sha = hashlib.sha256(data).hexdigest()
    facts = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if work.item is not None and work.item.embedded and work.item.sha256 == sha:
        return Prepared(work, "same", **facts)
    if sha in known:
        return Prepared(work, "copy", **facts)
    try:
        image = load_pixels(data, target_size=input_size, max_pixels=max_pixels)
        width, height = image_size(data)
    except ImageLoadError as exc:
        return Prepared(work, "broken", reason=str(exc), **facts)
    return Prepared(work, "embed", image=image, width=width, height=height, **facts)


def prepare_batch(batch: Sequence[Work], known: Container[str], input_size: int, max_pixels: int) -> list[Prepared]:
    return [prepare(work, known, input_size, max_pixels) for work in batch]


Encoded = dict[str, tuple[np.ndarray, bytes, int, int]]
"""sha256 → (embedding, packed head description, width, height) of images the network ran on."""


def encode_batch(model: CatalogueModel, prepared: Sequence[Prepared], known: Container[str]) -> Encoded:
    """Embed and describe, in one network pass, each distinct decoded image of a batch whose bytes no item
    embedded by this model holds (``known``): the network's share of a batch, in a plain run (``_commit_batch``)
    and on a Ray cluster (``indexer.distributed``) alike."""
    fresh: dict[str, Prepared] = {}
    for p in prepared:
        if p.kind == "embed" and p.sha256 not in known and p.sha256 not in fresh:
            fresh[p.sha256] = p
    if not fresh:
        return {}
    embeddings, descriptions = model.encode([p.image for p in fresh.values()])
    return {p.sha256: (np.asarray(vector, np.float16), description, p.width, p.height)
            for p, vector, description in zip(fresh.values(), embeddings, descriptions)}


BatchPipeline = Callable[[list[Work], dict[str, int], str, IndexReport], Iterator[tuple[list[Prepared], Encoded]]]
"""What reads the files to do: (work, ``known`` sha256 → item id, model key, report) → batches, each its
prepared files and whatever of them it already encoded. ``known`` grows as batches are committed."""


def _decoded_batches(model: CatalogueModel, options: IndexOptions, work: list[Work], known: dict[str, int], model_key: str,
                     report: IndexReport) -> Iterator[tuple[list[Prepared], Encoded]]:
    """The plain run's batches, decoded but not encoded: one thread reads, hashes and decodes the next batch
    while the network embeds this one (in ``_commit_batch``)."""
    size = max(1, int(options.batch_size))
    batches = [work[i : i + size] for i in range(0, len(work), size)]
    input_size = int(model.config.input_size)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="whymatch-decode") as pool:
        pending = pool.submit(prepare_batch, batches[0], known, input_size, options.max_pixels)
        for number in range(len(batches)):
            prepared = pending.result()
            if number + 1 < len(batches):
                pending = pool.submit(prepare_batch, batches[number + 1], known, input_size, options.max_pixels)
            yield prepared, {}


# ------------------------------------------------------------------------------------ the run


def index_catalogue(
    target: str | os.PathLike,
    *,
    model: CatalogueModel,
    db: Database,
    index_dir: str | os.PathLike,
    options: IndexOptions | None = None,
    log: Callable[[str], None] | None = None,
    pipeline: BatchPipeline | None = None,
) -> IndexReport:
    """Bring the catalogue of ``target`` (a folder or a CSV) up to date and save its FAISS index. ``pipeline``
    reads (and may embed) the files to do, e.g. on a Ray cluster (``indexer.distributed``); by default a
    thread decodes the next batch while this process embeds the current one."""
    options = options or IndexOptions()
    index_dir = Path(index_dir)
    started = time.perf_counter()
    report = IndexReport(source=str(target))
    with run_lock(index_dir, log):
        model_key = model_fingerprint(model)
        dim, metric = int(model.config.embed_dim), model.metric
        if options.index_factory:
            fx.new_index(dim, metric, options.index_factory)  # fail now on a bad string, not after embedding
        result = scan(target, options.listing_regex)
        report.scanned = len(result.entries) + len(result.skipped)
        report.skipped.extend(result.skipped)

        if options.rebuild:
            with db.session() as session:
                crud.clear_embeddings(session, origin=result.origin)
                crud.bump_version(session)
        with db.session() as session:
            report.shards_swept = db.vectors.sweep(set(crud.live_rows(session)))
        _recode_backlog(db, model, model_key, options, report)
        with db.session() as session:
            changes = diff(result, crud.item_states(session, model_key))
        report.unchanged = changes.unchanged
        _apply_deletions(db, changes, report)
        _embed(db, model, model_key, result.origin, changes.work, options, report, pipeline)
        _compact(db, report)

        generation, index, action = sync_index(
            db, fx.IndexStore(index_dir), model_key=model_key, metric=metric, dim=dim,
            factory=options.index_factory, rebuild=options.rebuild, report=report,
        )
        report.generation, report.index_factory, report.index_action, report.ntotal = generation.id, generation.factory, action, index.ntotal
    report.seconds = time.perf_counter() - started
    return report


def _apply_deletions(db: Database, changes: Diff, report: IndexReport) -> None:
    if not changes.deleted and not changes.relisted:
        return
    with db.session() as session:
        report.removed += crud.delete_items(session, changes.deleted)
        for item_id, listing, origin in changes.relisted:
            crud.update_item(session, item_id, listing=listing, origin=origin)
        report.touched += len(changes.relisted)
        crud.bump_version(session)


def _progress_bar(options: IndexOptions, total: int, description: str) -> tqdm:
    show = sys.stderr.isatty() if options.progress is None else options.progress
    return tqdm(total=total, unit="img", desc=description, disable=not show, dynamic_ncols=True)


def _recode_backlog(db: Database, model: CatalogueModel, model_key: str, options: IndexOptions, report: IndexReport) -> None:
    """Convert the items this model's weights embedded and described as float16 projections (indexed before
    the model had its codec) into its compact descriptions, from the stored projections alone
    (``recode_descriptions``: no file is read, no backbone runs), each batch written to a new shard and
    committed in one transaction with the items' new model key; their embeddings stay as they are."""
    if model.recodable_format is None:
        return
    old_key = model_fingerprint(model, model.recodable_format)
    with db.session() as session:
        total = crud.count_embedded(session, old_key)
    if not total:
        return
    size = max(1, int(options.batch_size))
    bar = _progress_bar(options, total, "compacting descriptions")
    last = -1
    while True:
        with db.session() as session:
            ids = crud.embedded_ids_after(session, old_key, after=last, limit=size)
            stored = db.vectors.rows(session, ids, old_key)
        if not ids:
            break
        last = ids[-1]
        ids = [i for i in ids if i in stored]
        if not ids:
            continue
        recoded = model.recode_descriptions([stored[i][1] for i in ids])
        with db.session() as session:
            version = crud.bump_version(session)
            shard = db.vectors.write(ids, np.stack([stored[i][0] for i in ids]), recoded, tag=version)
            for item_id in ids:
                crud.update_item(session, item_id, model_key=model_key, shard=shard)
        report.recoded += len(ids)
        bar.update(len(ids))
    bar.close()


def _compact(db: Database, report: IndexReport) -> None:
    """Rewrite the shards ``compaction_plan`` picks into new ones of at most ``SHARD_ROWS`` rows,
    each committed in one transaction that points its items at it; then the files no item points at any
    more (these, and shards whose items are all gone) are deleted, or by the next run's sweep should this
    one be killed first."""
    with db.session() as session:
        live = crud.live_rows(session)
        plan = compaction_plan(live)
        members = crud.shard_members(session, plan)
    if not plan:
        if len(live) < len(db.vectors.names()):
            db.vectors.sweep(set(live))
        return
    by_shard: dict[str, list[int]] = {}
    for item_id, name in members.items():
        by_shard.setdefault(name, []).append(item_id)
    pending: list[Rows] = []  # rows read, not yet written
    sources: dict[int, str] = {}

    def flush() -> None:
        rows = Rows(np.concatenate([r.ids for r in pending]), np.concatenate([r.embeddings for r in pending]),
                            [blob for r in pending for blob in r.descriptions])
        with db.session() as session:  # the items' embeddings do not change: no new catalogue version
            shard = db.vectors.write(rows.ids, rows.embeddings, rows.descriptions, tag=crud.catalogue_version(session))
            crud.move_to_shard(session, {int(i): sources[int(i)] for i in rows.ids}, shard)
        pending.clear()

    for name in sorted(by_shard):
        rows = db.vectors.read(name, by_shard[name])
        sources.update(dict.fromkeys(rows.ids.tolist(), name))
        pending.append(rows)
        if sum(len(r) for r in pending) >= SHARD_ROWS:
            flush()
    if pending:
        flush()
    with db.session() as session:
        db.vectors.sweep(set(crud.live_rows(session)))
    report.shards_compacted = len(plan)


def _embed(db: Database, model: CatalogueModel, model_key: str, origin: str, work: list[Work], options: IndexOptions,
           report: IndexReport, pipeline: BatchPipeline | None) -> None:
    if not work:
        return
    with db.session() as session:
        known = crud.embedded_shas(session, model_key)
    batches = (pipeline or partial(_decoded_batches, model, options))(work, known, model_key, report)
    bar = _progress_bar(options, len(work), "indexing")
    for prepared, encoded in batches:
        _commit_batch(db, model, model_key, origin, prepared, encoded, known, options, report)
        bar.update(len(prepared))
        bar.set_postfix(skipped=len(report.skipped), refresh=False)
    bar.close()


def _commit_batch(db: Database, model: CatalogueModel, model_key: str, origin: str, prepared: list[Prepared],
                  encoded: Encoded, known: dict[str, int], options: IndexOptions, report: IndexReport) -> None:
    """Embed what needs it (what ``encoded`` does not already hold), then write the whole batch in one transaction.

    ``known`` (sha256 → id of an item embedded by this model) is kept true as items change, so a
    copy is only ever taken from an item whose embedding is of those very bytes.
    """
    input_size = int(model.config.input_size)
    for n, p in enumerate(prepared):
        if p.kind == "copy" and p.sha256 not in known:  # its source item changed since the reader looked
            prepared[n] = prepare(p.work, {}, input_size, options.max_pixels)
    t0 = time.perf_counter()
    vectors = encode_batch(model, [p for p in prepared if p.sha256 not in encoded], known)
    if vectors:
        report.embed_seconds += time.perf_counter() - t0
    vectors.update(encoded)
    report.embedded += len(vectors)
    fresh = set(vectors)  # the images embedded for this batch; any other write copies an embedding

    forgotten: list[tuple[str, int]] = []  # (old sha, id) of items that no longer hold those bytes
    with db.session() as session:
        # Read copy sources before this batch writes anything.
        needed = {p.sha256 for p in prepared if p.kind in ("copy", "embed") and p.sha256 not in vectors}
        sources = crud.items_by_ids(session, [known[sha] for sha in needed])
        rows = db.vectors.rows(session, [known[sha] for sha in needed], model_key)
        for sha in needed:
            source_item = sources.get(known[sha])
            if source_item is None or source_item.id not in rows or source_item.sha256 != sha:
                raise RuntimeError(f"lost the embedding of {sha} while indexing")
            vectors[sha] = (*rows[source_item.id], source_item.width, source_item.height)

        writes = any(p.kind != "broken" or p.work.item is not None for p in prepared)
        version = crud.bump_version(session) if writes else crud.catalogue_version(session)
        embedded: list[tuple[str, Item | int]] = []  # (sha256, item or id) of the items whose row this batch's shard holds
        for p in prepared:
            entry, item = p.work.entry, p.work.item
            if p.kind == "broken":
                report.skipped.append(Skipped(entry.source, p.reason))
                if item is not None:
                    report.removed += crud.delete_items(session, [item.id])
                    forgotten.append((item.sha256, item.id))
                continue
            stat = {"size_bytes": p.size, "mtime_ns": p.mtime_ns, "listing": entry.listing, "origin": origin}
            if p.kind == "same":
                crud.update_item(session, item.id, **stat)
                report.touched += 1
                continue
            if p.sha256 in fresh:
                fresh.discard(p.sha256)
            else:
                report.exact_duplicates += 1
            _, _, width, height = vectors[p.sha256]
            values = {**stat, "sha256": p.sha256, "width": width, "height": height, "model_key": model_key, "embedded_version": version}
            if item is None:
                embedded.append((p.sha256, crud.add_item(session, entry.source, **values)))
                report.added += 1
            else:
                crud.update_item(session, item.id, **values)
                embedded.append((p.sha256, item.id))
                if item.sha256 != p.sha256:
                    forgotten.append((item.sha256, item.id))
                report.updated += 1
        session.flush()
        written_ids = [(sha, row if isinstance(row, int) else row.id) for sha, row in embedded]
        if written_ids:
            shard = db.vectors.write([item_id for _, item_id in written_ids], np.stack([vectors[sha][0] for sha, _ in written_ids]),
                                     [vectors[sha][1] for sha, _ in written_ids], tag=version)
            for _, item_id in written_ids:
                crud.update_item(session, item_id, shard=shard)
    # Committed: now the map may point at these items.
    for sha, item_id in forgotten:
        if known.get(sha) == item_id:
            del known[sha]
    for sha, item_id in written_ids:
        known.setdefault(sha, item_id)


# ------------------------------------------------------------------------------------ the FAISS index



def sync_index(db: Database, store: fx.IndexStore, *, model_key: str, metric: str, dim: int, factory: str | None = None,
               rebuild: bool = False, report: IndexReport | None = None) -> tuple[IndexGeneration, fx.CatalogueIndex, str]:
    """Make the newest complete generation match the database: keep it, update it, or rebuild it. An index
    kept on disk (``fx.wants_ondisk``) is rebuilt whenever the catalogue changed."""
    with db.session() as session:
        version = crud.catalogue_version(session)
        latest = crud.latest_generation(session)
        n = crud.count_embedded(session, model_key)
    wanted = factory or fx.choose_factory(n, dim)
    usable = (latest is not None and not rebuild and latest.model_key == model_key and latest.metric == metric
              and latest.dim == dim and latest.factory == wanted and store.exists(latest.filename))
    index = None
    if usable:
        try:
            index = store.load(latest.filename)
        except (RuntimeError, ValueError, OSError):
            index = None
    if index is not None and latest.catalogue_version == version and index.ntotal == n == latest.ntotal:
        return latest, index, "unchanged"

    counts = {}
    if report is not None:
        counts = {"n_added": report.added, "n_updated": report.updated, "n_removed": report.removed,
                  "n_exact_duplicates": report.exact_duplicates, "n_skipped": len(report.skipped)}
    if fx.wants_ondisk(n, dim, wanted):
        with db.session() as session:
            version = crud.catalogue_version(session)
            generation = crud.start_generation(session, catalogue_version=version, model_key=model_key, metric=metric,
                                               dim=dim, factory=wanted, ntotal=n, **counts)
        filename = store.filename(generation.id)
        index = _build_ondisk(db, store.ondisk(filename), model_key=model_key, metric=metric, dim=dim, factory=wanted, n=n)
        return _complete(db, store, generation.id, filename), index, "rebuilt"

    action = "updated"
    if isinstance(index, faiss.Index) and index.ntotal == latest.ntotal:
        index, version = _update_index(db, index, model_key, dim, latest.catalogue_version)
    else:
        index = None
    if index is None:
        action = "rebuilt"
        with db.session() as session:
            version = crud.catalogue_version(session)
            ids, vectors = db.vectors.embeddings(session, model_key, dim)
        wanted = factory or fx.choose_factory(len(ids), dim)
        index = fx.build_index(vectors, ids, metric, wanted)

    with db.session() as session:
        generation = crud.start_generation(session, catalogue_version=version, model_key=model_key, metric=metric, dim=dim,
                                           factory=wanted, ntotal=int(index.ntotal), **counts)
    filename = store.filename(generation.id)
    store.save(index, filename)
    return _complete(db, store, generation.id, filename), index, action


def _complete(db: Database, store: fx.IndexStore, generation_id: int, filename: str) -> IndexGeneration:
    """Mark a generation whose files are written complete, and delete the files of older ones but the last."""
    with db.session() as session:
        crud.complete_generation(session, generation_id, filename)
        keep = crud.complete_filenames(session)
        generation = crud.get_generation(session, generation_id)
    store.cleanup(keep)
    return generation


def _build_ondisk(db: Database, files: fx.OnDiskFiles, *, model_key: str, metric: str, dim: int, factory: str,
                  n: int) -> fx.OnDiskIndex:
    """The on-disk index of the ``n`` embeddings of ``model_key``: copied shard by shard into its memory-mapped
    vectors file (never all in memory), then trained, filled and merged (``fx.build_ondisk``)."""
    vectors = fx.create_vectors(files, n, dim)
    ids = np.empty(n, np.int64)
    row = 0
    with db.session() as session:
        for block_ids, block in db.vectors.iter_embeddings(session, model_key):
            if row + len(block_ids) > n:
                raise RuntimeError(f"the catalogue changed while its index was built ({n} embeddings counted)")
            vectors[row : row + len(block_ids)], ids[row : row + len(block_ids)] = block, block_ids
            row += len(block_ids)
    if row != n:
        raise RuntimeError(f"the catalogue changed while its index was built ({n} embeddings counted, {row} read)")
    vectors.flush()
    del vectors
    fx.write_ids(files, ids)
    fx.build_ondisk(files, metric, factory)
    return fx.load_ondisk(files)


def _update_index(db: Database, index: faiss.Index, model_key: str, dim: int, built_at: int) -> tuple[faiss.Index | None, int]:
    """Remove deleted and re-embedded ids, add new ones; None when this index kind cannot remove."""
    with db.session() as session:
        version = crud.catalogue_version(session)
        db_ids = crud.embedded_ids(session, model_key)
        changed = np.asarray(crud.ids_embedded_since(session, model_key, built_at), np.int64)
        have = fx.ids_of(index)
        stale = np.union1d(np.setdiff1d(have, db_ids), np.intersect1d(have, changed))
        try:
            fx.remove(index, stale)
        except RuntimeError:
            return None, version
        missing = np.setdiff1d(db_ids, fx.ids_of(index))
        ids, vectors = db.vectors.embeddings(session, model_key, dim, ids=missing.tolist())
    fx.add(index, vectors, ids)
    if index.ntotal != len(db_ids) or not np.array_equal(np.sort(fx.ids_of(index)), db_ids):
        return None, version
    return index, version


def load_current_index(db: Database, store: fx.IndexStore, *, model_key: str, metric: str, dim: int,
                       log: Callable[[str], None] | None = None) -> tuple[fx.CatalogueIndex, IndexGeneration | None, bool]:
    """The index to search: the newest complete generation, checked against the database.

    Returns (index, generation, stale). A missing or unreadable file, or one made by another model,
    is replaced by an index built in memory from the embeddings in the shards. A file behind the
    database (an index run was interrupted) is used as it is and reported stale: ids it holds that
    are gone from the database are dropped from results by the caller.
    """
    with db.session() as session:
        latest = crud.latest_generation(session)
        version = crud.catalogue_version(session)
    if latest is not None and latest.model_key == model_key and latest.metric == metric and latest.dim == dim:
        try:
            index = store.load(latest.filename)
            if index.ntotal == latest.ntotal:
                stale = latest.catalogue_version != version
                if stale and log:
                    log(f"the index (generation {latest.id}) is behind the catalogue: run `whymatch index` to bring it up to date")
                return index, latest, stale
        except (RuntimeError, ValueError, OSError):
            pass
    if log:
        log("no usable index file: building one in memory from the stored embeddings (run `whymatch index` to save one)")
    with db.session() as session:
        ids, vectors = db.vectors.embeddings(session, model_key, dim)
    return fx.build_index(vectors, ids, metric, fx.choose_factory(len(ids), dim)), None, False
