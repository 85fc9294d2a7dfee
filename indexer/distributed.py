"""Indexing and duplicate detection on a Ray cluster (``whymatch index --ray``, ``whymatch dedup --ray``).

What runs where:

* **index**: the driver (this process) scans and diffs as a plain run does; a Ray Data pipeline then reads,
  hashes, decodes, embeds and describes the files to do in a pool of actors (``_Encoder``, each loading
  the model once from its checkpoint), and the driver commits each batch it gets back with the plain
  run's code (``indexing._commit_batch``: one transaction per batch) and syncs the FAISS index. The
  database is the driver's alone, so a killed run resumes like a plain one, and a batch that reaches the
  driver twice (a task retried after a node died) is committed once.
* **dedup**: the k-NN graph is searched as Ray tasks over blocks of the catalogue's embeddings (the index
  and the vectors put in the object store once), and the candidate pairs are re-scored by the head as
  Ray tasks over chunks of pairs, each given its items' descriptions (read from the database by the
  driver). Thresholds, groups, verification and storage stay on the driver (``dedup.find_duplicates``).

Workers read the catalogue's files by the paths the driver scanned, so every node must see them at
those paths (a shared file system), and must have whymatch installed; each loads the model from the
checkpoint the driver's settings name (a path every node sees) and refuses to run if that is not the
driver's model (its fingerprint differs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import faiss
import numpy as np

from engine.config import ModelSettings
from indexer import faiss_index as fx
from indexer.catalogue import Work
from indexer.db import Database
from indexer.dedup import DedupOptions, DedupReport, add_neighbours, find_duplicates, neighbour_block, score_pairs, verify_pairs
from indexer.indexing import (
    Encoded,
    IndexOptions,
    IndexReport,
    Prepared,
    encode_batch,
    index_catalogue,
    model_fingerprint,
    prepare_batch,
)
from indexer.model import CatalogueModel

# Candidate pairs per re-scoring task, in units of DedupOptions.pair_batch (each task gets the
# descriptions of its pairs' items: ~150 KB each for the shipped model).
SCORE_TASK_BATCHES = 16
# Re-scoring tasks in flight per CPU of the cluster: bounds the descriptions the driver holds.
TASKS_PER_CPU = 2


@dataclass(frozen=True)
class RayCluster:
    """Where to run: ``address`` of a running cluster (``ray start --head`` prints it; "auto": the one started on
    this machine; "local": a new local instance for the run), or None for ``ray.init()``'s choice: the cluster
    at ``$RAY_ADDRESS``, else one started on this machine, else a new local instance. ``workers``: embedding
    actors and search blocks (default: one per CPU of the cluster)."""

    address: str | None = None
    workers: int | None = None


@contextmanager
def connected(cluster: RayCluster) -> Iterator[int]:
    """Connect to (or start) the cluster for one run and disconnect afterwards; yields the workers to use.
    A process already connected to Ray stays connected, to the cluster it chose."""
    import ray  # defers ray: only --ray runs need it

    owned = not ray.is_initialized()
    if owned:
        ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    finally:
        if owned:
            ray.shutdown()


def worker_settings(settings: ModelSettings) -> ModelSettings:
    """The model settings as workers must read them: the checkpoint path absolute (a worker's working
    directory is not the driver's)."""
    if settings.model_path is None:
        return settings
    return settings.model_copy(update={"model_path": Path(os.path.abspath(settings.model_path))})


def load_checked_model(settings: ModelSettings, model_key: str) -> CatalogueModel:
    """The model ``settings`` name, loaded; ValueError unless it is the catalogue's (``model_key``): a worker
    must never embed or score with another model than the driver's."""
    from engine.inference import load_model  # defers torch to the processes that need the model

    model = load_model(settings.model_path, threads=settings.threads, batch_size=settings.backbone_batch, device=settings.device)
    loaded = model_fingerprint(model)
    if loaded != model_key:
        raise ValueError(f"Ray workers would load model {loaded[:12]} from {settings.model_path or 'the shipped checkpoint'}, "
                         f"not the catalogue's model {model_key[:12]}: give the model as a checkpoint every node reads "
                         "(--model or WHYMATCH_MODEL_PATH)")
    return model


_models: dict[str, CatalogueModel] = {}  # per worker process: tasks of one job reuse its process


def _worker_model(settings: ModelSettings, model_key: str) -> CatalogueModel:
    """The driver's model, loaded once per worker process."""
    if model_key not in _models:
        _models[model_key] = load_checked_model(settings, model_key)
    return _models[model_key]


# ------------------------------------------------------------------------------------ index


class _Encoder:
    """A Ray Data actor: reads, hashes, decodes, embeds and describes batches of files (``indexing.prepare_batch``
    and ``indexing.encode_batch``, as a plain run does), with the model loaded once."""

    def __init__(self, settings: ModelSettings, model_key: str, known: set[str], max_pixels: int) -> None:
        self.model = _worker_model(settings, model_key)
        self.known, self.max_pixels = known, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = prepare_batch(batch["item"], self.known, int(self.model.config.input_size), self.max_pixels)
        encoded = encode_batch(self.model, prepared, self.known)
        # Each row carries its own vectors, whatever batches the driver regroups rows into.
        rows = [encoded.get(p.sha256) if p.kind == "embed" else None for p in prepared]
        return {
            "prepared": _objects([replace(p, image=None) for p in prepared]),
            "embedding": _objects([row[0].tobytes() if row else b"" for row in rows]),  # float16 bytes: one arrow type
            "description": _objects([row[1] if row else b"" for row in rows]),
        }


def _objects(values: Sequence[object]) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def actor_placement(settings: ModelSettings, workers: int) -> tuple[ModelSettings, dict]:
    """Where the encoding actors run: one per GPU of the cluster, each holding one, when the device setting
    asks for CUDA (``cuda``, or ``auto`` on a cluster with GPUs); else ``workers`` CPU actors, told to use
    the CPU (Ray hides a node's GPUs from actors that did not ask for one, so ``auto`` must not decide
    there). Returns the settings the actors load the model with, and ``map_batches`` options."""
    import ray  # defers ray: only --ray runs need it

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if settings.device == "cuda" and not gpus:
        raise ValueError("WHYMATCH_DEVICE=cuda, but the Ray cluster has no GPU: use auto or cpu, or add GPU nodes")
    if settings.device == "cuda" or (settings.device == "auto" and gpus):
        return settings.model_copy(update={"device": "cuda"}), {"size": max(1, min(workers, gpus)), "num_gpus": 1}
    return settings.model_copy(update={"device": "cpu"}), {"size": workers}


def ray_batches(settings: ModelSettings, options: IndexOptions, workers: int, work: list[Work], known: dict[str, int],
                model_key: str, report: IndexReport) -> Iterator[tuple[list[Prepared], Encoded]]:
    """``indexing.BatchPipeline`` on the connected Ray cluster: ``workers`` actors read and encode the files to
    do, batches come back as they are done. Files whose bytes ``known`` held when the run started are
    copied by the driver, not embedded. ``report.embed_seconds`` is the pipeline's wall time."""
    import ray.data  # defers ray: only --ray runs need it

    settings = worker_settings(settings)
    # A wrong model fails here, in words, not as a dead actor; the fingerprint is the same on any device.
    load_checked_model(settings.model_copy(update={"device": "cpu"}), model_key)
    settings, actor_options = actor_placement(settings, workers)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own bar counts committed files
    context.enable_fallback_to_arrow_object_ext_type = True  # rows are Work objects, pickled
    size = max(1, int(options.batch_size))
    encoded = ray.data.from_items(work).map_batches(
        _Encoder, fn_constructor_kwargs={"settings": settings, "model_key": model_key, "known": set(known),
                                         "max_pixels": options.max_pixels},
        compute=ray.data.ActorPoolStrategy(size=actor_options.pop("size")), batch_size=size, batch_format="numpy",
        **actor_options)
    started = time.perf_counter()
    done: set[str] = set()
    for batch in encoded.iter_batches(batch_size=size, batch_format="numpy"):
        prepared, vectors = [], {}
        for p, embedding, description in zip(batch["prepared"], batch["embedding"], batch["description"]):
            if p.work.entry.source in done:  # delivered again after a retry: committed already
                continue
            done.add(p.work.entry.source)
            prepared.append(p)
            if description:
                vectors[p.sha256] = (np.frombuffer(embedding, np.float16), description, p.width, p.height)
        if prepared:
            yield prepared, vectors
    report.embed_seconds += time.perf_counter() - started


def index_on_ray(target: str | os.PathLike, cluster: RayCluster, *, model: CatalogueModel, settings: ModelSettings,
                 db: Database, index_dir: str | os.PathLike, options: IndexOptions | None = None,
                 log: Callable[[str], None] | None = None) -> IndexReport:
    """``indexing.index_catalogue`` with the files read and embedded on a Ray cluster; ``model`` is the
    driver's (for the model key and the few files it re-reads), ``settings`` say where workers load it from."""
    options = options or IndexOptions()
    with connected(cluster) as workers:
        return index_catalogue(target, model=model, db=db, index_dir=index_dir, options=options, log=log,
                               pipeline=partial(ray_batches, settings, options, workers))


# ------------------------------------------------------------------------------------ dedup


def _search_block(source: np.ndarray | fx.OnDiskFiles, vectors: np.ndarray, start: int, stop: int,
                  k: int) -> tuple[int, np.ndarray, np.ndarray]:
    index = fx.load_ondisk(source) if isinstance(source, fx.OnDiskFiles) else faiss.deserialize_index(source)
    return start, *neighbour_block(index, vectors[start:stop], k)


def ray_candidates(workers: int, db: Database, index: fx.CatalogueIndex, model_key: str, k: int,
                   valid: set[int]) -> dict[tuple[int, int], float]:
    """``dedup.knn_candidates`` as Ray tasks, each searching a block of the catalogue's items: with a copy of
    an in-memory index, or mapping the files of an on-disk one (which every node must then reach at the
    same path, like the photos)."""
    import ray  # defers ray: only --ray runs need it

    with db.session() as session:
        ids, vectors = db.vectors.embeddings(session, model_key, int(index.d))
    source = index.files if isinstance(index, fx.OnDiskIndex) else faiss.serialize_index(index)
    index_ref, vectors_ref = ray.put(source), ray.put(vectors)
    search = ray.remote(_search_block)
    block = max(1, -(-len(ids) // (2 * workers)))
    pending = [search.remote(index_ref, vectors_ref, start, min(start + block, len(ids)), k)
               for start in range(0, len(ids), block)]
    pairs: dict[tuple[int, int], float] = {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        start, sims, neighbours = ray.get(ready[0])
        add_neighbours(pairs, ids[start : start + len(sims)], sims, neighbours, valid)
    return pairs


def _score_chunk(settings: ModelSettings, model_key: str, pairs: list[tuple[int, int]], descriptions: dict[int, bytes],
                 batch: int) -> list[float]:
    return score_pairs(_worker_model(settings, model_key), pairs, descriptions, batch)


def ray_rescore(settings: ModelSettings, workers: int, model: CatalogueModel, pairs: list[tuple[int, int]],
                options: DedupOptions, *, db: Database, model_key: str) -> dict[tuple[int, int], float]:
    """``dedup.rescore`` as Ray tasks over chunks of pairs, each given its items' descriptions by reference;
    at most ``TASKS_PER_CPU`` chunks per worker are in flight, so the driver holds a bounded part of them."""
    import ray  # defers ray: only --ray runs need it

    batch = max(1, options.pair_batch)
    size = batch * SCORE_TASK_BATCHES
    score = ray.remote(_score_chunk)
    # Scoring from stored descriptions is the head alone: CPU tasks, whatever the device setting.
    settings = worker_settings(settings).model_copy(update={"device": "cpu"})
    if pairs:
        load_checked_model(settings, model_key)  # a wrong model fails here, in words, not in a task
    scores: dict[tuple[int, int], float] = {}
    pending: dict[ray.ObjectRef, list[tuple[int, int]]] = {}

    def collect(n_ready: int) -> None:
        ready, _ = ray.wait(list(pending), num_returns=n_ready)
        for ref in ready:
            scores.update(zip(pending.pop(ref), ray.get(ref)))

    for start in range(0, len(pairs), size):
        chunk = pairs[start : start + size]
        with db.session() as session:
            descriptions = db.vectors.descriptions(session, list({i for pair in chunk for i in pair}), model_key)
        pending[score.remote(settings, model_key, chunk, ray.put(descriptions), batch)] = chunk
        if len(pending) >= TASKS_PER_CPU * workers:
            collect(1)
    if pending:
        collect(len(pending))
    return scores


def ray_verify(workers: int, pairs: list[tuple[int, int]], files: Mapping[int, tuple[str, str]]) -> set[tuple[int, int]]:
    """``dedup.verify_pairs`` as Ray tasks over chunks of pairs (in item order, so a chunk extracts most of its
    photos' keypoints once); every node must read the photos at the catalogue's paths."""
    import ray  # defers ray: only --ray runs need it

    task = ray.remote(verify_pairs)
    size = max(1, -(-len(pairs) // (TASKS_PER_CPU * workers)))
    refs = [task.remote(chunk, {i: files[i] for pair in chunk for i in pair})
            for chunk in (pairs[s : s + size] for s in range(0, len(pairs), size))]
    return set().union(*ray.get(refs)) if refs else set()


def dedup_on_ray(cluster: RayCluster, *, model: CatalogueModel, settings: ModelSettings, db: Database, index: fx.CatalogueIndex,
                 model_key: str, generation_id: int | None = None, options: DedupOptions | None = None) -> DedupReport:
    """``dedup.find_duplicates`` with the k-NN graph, the head's re-scoring and the geometric verification on a
    Ray cluster; the run is stored as a plain one is."""
    with connected(cluster) as workers:
        return find_duplicates(model=model, db=db, index=index, model_key=model_key, generation_id=generation_id,
                               options=options, candidates=partial(ray_candidates, workers),
                               rescorer=partial(ray_rescore, settings, workers), verifier=partial(ray_verify, workers))
