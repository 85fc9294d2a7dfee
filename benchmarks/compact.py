"""Compact descriptions benchmark: how small can a stored item's description get before re-scoring changes?

A model without a description codec stores each item's projections (``SimilarityModel.describe_fmaps``:
float16, ~147 KiB); the full descriptions below are those. Each candidate is encoded from the held-apart
photos' feature maps, decoded, and scored by the shipped model's head (``signature_logit``) exactly as
the full descriptions are, on the data sets of
benchmarks/trust.py (``split(data, 0.3, seed=0)[1]`` of AirBnB, flowers and skin-cancer, their feature
maps cached in ``.cache/whymatch/bench/features``):

* **AirBnB**: R@1 (the top 20 by the index's float32 embedding, re-scored by the head from the
  descriptions, as search does) and pair AUC over all pairs, as ``engine.eval.evaluate.evaluate_fmaps``;
* **copy detection**: R@1 and pair AUC of one edited copy of a sample of held-apart photos among all of
  them (the same copies and protocol as trust.py);
* **false matches** at the model's threshold on random pairs of different photos within each domain,
  and how many of every pair scored here change decision against the full descriptions;
* **bytes per item**, the global embedding included (the head's cosine term needs it).

Candidates: the signature as float16; the local cells as int8 with a float16 scale per cell; PCA of the
cells to fewer dimensions, int8; product quantisation of the cells (``engine.nn.compact``, 8 bits per
slice); the cells of a 7×7 grid (the feature map average-pooled 2×2). PCA bases and PQ codebooks are
fitted on cells of the model's *training* photos (``split(data, 0.3, seed=0)[0]``), never the held-apart
ones. ``--save-codec DIR`` also saves the benchmarked product quantiser of ``--save-codec-subquantizers``
slices next to a checkpoint (``DescriptionCodec.save``).

``--codec-study`` measures instead how the 32-slice codec's fit changes the result (recorded in its own
section): the codebooks fitted on ``--fit-photos`` or ``--more-fit-photos`` training photos per domain
(every cell used), each with and without an OPQ rotation (``DescriptionCodec.fit(rotate=True)``);
``--save-codec`` then saves the one ``--save-codec-fit`` names (all four are kept in
``.cache/whymatch/bench/codecs``).

``--catalogue N`` measures bytes per item all in instead (its own section): N AirBnB photos indexed
into a fresh data directory (SQLite database, FAISS index) by the model without its codec (float16
projections), by the model with it, and the first catalogue converted by the next index run with the
codec (``indexing._recode_backlog``); the data directory's size divided by the items.

    .venv/bin/python benchmarks/compact.py --threads 1 --record
    .venv/bin/python benchmarks/compact.py --threads 1 --record --codec-study --save-codec engine/models/default --save-codec-fit OPQ-more
    .venv/bin/python benchmarks/compact.py --threads 1 --record --catalogue 200
    .venv/bin/python benchmarks/compact.py --per-domain 20 --pairs 500 --fit-photos 40     # smoke run
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common import BENCH_DIR, add_model_option, command_line, load_bench_model, markdown_table, record, shared_data
from engine.data import LabelledImages, file_identities, load_labelled_images, readable_paths, split
from engine.eval.evaluate import RERANK_K
from engine.eval.metrics import all_pairs, pair_metrics
from engine.inference import SimilarityModel, pack_description
from engine.nn.compact import OPQ_CELLS, DescriptionCodec, projection_norms
from engine.nn.siamese import MatchNet, signatures
from engine.train.trainer import cached_features
from indexer import Catalogue, crud
from trust import DOMAINS, HOLDOUT, SEED, held_apart, held_apart_copies, log, random_pairs

Signature = tuple[Tensor, Tensor]
# Feature maps turned into descriptions per step (a 1280-channel 14×14 map is 1 MB in float32).
CHUNK = 128
# Limits of the task (issue 22): bytes per item, and the largest drop in AirBnB R@1 and pair AUC.
MAX_BYTES, MAX_DROP = 8192, 0.005


@dataclass
class Candidate:
    """A way to store descriptions: ``encode_decode`` turns feature maps (and their float32 signature,
    computed once for all candidates) into the decoded signatures the head scores, and the size of one
    stored item."""

    name: str
    encode_decode: Callable[[MatchNet, Tensor, Signature], tuple[Signature, int]]
    item_bytes: int = 0

    def describe(self, net: MatchNet, fmaps: Tensor, signature: Signature) -> Signature:
        parts = []
        with torch.inference_mode():
            for start in range(0, len(fmaps), CHUNK):
                chunk = slice(start, start + CHUNK)
                decoded, self.item_bytes = self.encode_decode(net, fmaps[chunk].float(), (signature[0][chunk], signature[1][chunk]))
                parts.append(decoded)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class Described:
    """One candidate's decoded descriptions of each named set of feature maps, scored by the head."""

    def __init__(self, net: MatchNet, candidate: Candidate, sets: dict[str, Tensor], exact: dict[str, Signature]) -> None:
        self.net = net
        self.signatures = {name: candidate.describe(net, fmaps, exact[name]) for name, fmaps in sets.items()}

    def pairs(self, set_a: str, i: np.ndarray, set_b: str, j: np.ndarray) -> np.ndarray:
        """Head scores of the pairs (item i of ``set_a``, item j of ``set_b``)."""
        with torch.inference_mode():
            scores = self.net.score_pairs(self.signatures[set_a], np.asarray(i), self.signatures[set_b], np.asarray(j))
        return scores.cpu().numpy().astype(np.float32)


def int8_rows(x: Tensor) -> tuple[Tensor, int]:
    """Rows of ``x`` through int8 with a float16 scale each (symmetric, max-abs), and the bytes stored."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).half().float().clamp(min=1e-8)
    return torch.round(x / scale).clamp(-127, 127) * scale, x.shape[-1] + 2


def float16(x: Tensor) -> Tensor:
    return x.half().float()


def full(net: MatchNet, fmaps: Tensor, _: Signature) -> tuple[Signature, int]:
    projections = net.project(fmaps)
    return net.signature_from_projections(float16(projections)), len(pack_description((projections[0],)))


def signature_float16(net: MatchNet, fmaps: Tensor, signature: Signature) -> tuple[Signature, int]:
    embedding, cells = signature
    return (F.normalize(float16(embedding), dim=1), F.normalize(float16(cells), dim=2)), 2 * (embedding.shape[1] + cells[0].numel())


def cells_int8(net: MatchNet, fmaps: Tensor, signature: Signature) -> tuple[Signature, int]:
    embedding, cells = signature
    decoded, per_cell = int8_rows(cells)
    return (F.normalize(float16(embedding), dim=1), F.normalize(decoded, dim=2)), 2 * embedding.shape[1] + cells.shape[1] * per_cell


def pca_int8(mean: Tensor, basis: Tensor) -> Callable[[MatchNet, Tensor, Signature], tuple[Signature, int]]:
    """Cells as their coordinates on the first principal axes (``basis``: dims × cell_dim), int8 per cell."""

    def encode_decode(net: MatchNet, fmaps: Tensor, signature: Signature) -> tuple[Signature, int]:
        embedding, cells = signature
        coordinates, per_cell = int8_rows((cells - mean) @ basis.T)
        return (F.normalize(float16(embedding), dim=1), F.normalize(mean + coordinates @ basis, dim=2)), 2 * embedding.shape[1] + cells.shape[1] * per_cell

    return encode_decode


def product_quantiser(codec: DescriptionCodec, pool: bool = False) -> Callable[[MatchNet, Tensor, Signature], tuple[Signature, int]]:
    """``engine.nn.compact``'s codec, of the model's grid or (``pool``) of the 2×2-pooled one (see ``pooled_int8``)."""

    def encode_decode(net: MatchNet, fmaps: Tensor, signature: Signature) -> tuple[Signature, int]:
        if pool:
            fmaps = F.avg_pool2d(fmaps, 2)
            signature = (signature[0], net.local_descriptors(fmaps))
        blobs = codec.encode(*signature, tuple(fmaps.shape[2:]), projection_norms(net, net.project(fmaps)))
        return codec.decode(blobs)[0], len(blobs[0])

    return encode_decode


def pooled_int8(net: MatchNet, fmaps: Tensor, signature: Signature) -> tuple[Signature, int]:
    """The descriptors of the 2×2-average-pooled map (a 7×7 grid: the projection is linear, so this is the
    pooled projection), int8 per cell; the embedding is the full map's."""
    embedding = signature[0]
    cells = net.local_descriptors(F.avg_pool2d(fmaps, 2))
    decoded, per_cell = int8_rows(cells)
    return (F.normalize(float16(embedding), dim=1), F.normalize(decoded, dim=2)), 2 * embedding.shape[1] + cells.shape[1] * per_cell


def training_cells(model: SimilarityModel, per_domain: int, seed: int, pool: bool = False) -> tuple[Tensor, dict]:
    """Unit local descriptors of a seeded sample of each domain's training photos (``split(...)[0]``), and
    where they came from."""
    rng = np.random.default_rng([seed, 7])
    cells, sources = [], []
    for name in DOMAINS:
        data = load_labelled_images(shared_data(name))
        kept = data.subset(split(data, HOLDOUT, SEED)[0])
        readable = readable_paths(kept.paths, model.config.input_size)[0]
        chosen = np.sort(rng.choice(readable, size=min(per_domain, len(readable)), replace=False))
        paths = [kept.paths[c] for c in chosen]
        fmaps = cached_features(model, paths, BENCH_DIR / "features", with_flips=False, progress=sys.stderr.isatty()).features
        with torch.inference_mode():
            for chunk in fmaps.split(CHUNK):
                chunk = F.avg_pool2d(chunk.float(), 2) if pool else chunk.float()
                cells.append(model.net.local_descriptors(chunk).flatten(0, 1))
        sources.append({"data": name, "split": f"split(data, {HOLDOUT}, seed={SEED})[0]", "photos": len(paths), "sample_seed": seed})
    return torch.cat(cells), {"photos": sources, "grid": "7×7 (pooled)" if pool else "the model's"}


def principal_axes(cells: Tensor, dims: int) -> tuple[Tensor, Tensor]:
    mean = cells.mean(dim=0)
    _, vectors = torch.linalg.eigh(torch.cov((cells - mean).T.double()))
    return mean, vectors[:, -dims:].T.float().contiguous()


def first_hits(described: Described, query_set: str, emb_q: Tensor, gallery_set: str, emb_g: Tensor,
               excluded: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Whether each query's first result is a positive when the top ``RERANK_K`` by embedding (``excluded``
    never ranked) are re-scored by the head, as search ranks; a tie with a negative counts as a miss."""
    sims = (emb_q @ emb_g.T).numpy()
    sims[excluded] = -np.inf
    top = np.argsort(-sims, axis=1)[:, : min(RERANK_K, sims.shape[1] - 1)]
    scores = described.pairs(query_set, np.repeat(np.arange(len(sims)), top.shape[1]), gallery_set, top.ravel()).reshape(top.shape)
    is_positive = np.take_along_axis(positive, top, axis=1)
    return np.where(is_positive, scores, -np.inf).max(axis=1) > np.where(is_positive, -np.inf, scores).max(axis=1)


def airbnb_quality(described: Described, emb: Tensor, groups: list[str]) -> dict:
    """R@1 (``first_hits``, each photo querying the others) and the head's scores and pair AUC over all pairs."""
    codes = np.unique(np.array(groups), return_inverse=True)[1]
    positive = (codes[:, None] == codes[None, :]) & ~np.eye(len(codes), dtype=bool)
    has_partner = positive.any(axis=1)
    hits = first_hits(described, "airbnb", emb, "airbnb", emb, np.eye(len(codes), dtype=bool), positive)
    i, j, labels = all_pairs(groups)
    scores = described.pairs("airbnb", i, "airbnb", j)
    return {"recall@1": float(hits[has_partner].mean()), "pair_auc": pair_metrics(scores, labels)["pair_auc"], "scores": scores}


def copy_quality(described: Described, emb_copies: Tensor, emb_gallery: Tensor, originals: np.ndarray,
                 gallery_groups: list[str], copy_groups: list[str], negatives_per_copy: int) -> dict[str, float]:
    """R@1 of each copy's original among the gallery (the original's other group members left out) and
    pair AUC of copy–original pairs against a seeded uniform draw of copy–other pairs (as trust.py)."""
    n, size = len(originals), len(gallery_groups)
    codes = {g: k for k, g in enumerate(dict.fromkeys(gallery_groups))}
    excluded = np.array([codes[g] for g in gallery_groups])[None, :] == np.array([codes[g] for g in copy_groups])[:, None]
    excluded[np.arange(n), originals] = False
    positive = np.zeros((n, size), dtype=bool)
    positive[np.arange(n), originals] = True
    hits = first_hits(described, "copies", emb_copies, "gallery", emb_gallery, excluded, positive)
    rng = np.random.default_rng(SEED)
    negatives = [rng.choice(others, size=min(negatives_per_copy, others.size), replace=False)
                 for others in (np.flatnonzero(~excluded[q] & ~positive[q]) for q in range(n))]
    i = np.concatenate([np.arange(n), *[np.full(len(d), q) for q, d in enumerate(negatives)]])
    j = np.concatenate([originals, *negatives])
    labels = np.r_[np.ones(n, dtype=int), np.zeros(len(i) - n, dtype=int)]
    return {"recall@1": float(hits.mean()), "pair_auc": pair_metrics(described.pairs("copies", i, "gallery", j), labels)["pair_auc"]}


def all_candidates(model: SimilarityModel, args: argparse.Namespace) -> tuple[list[Candidate], Tensor]:
    """Every way to store descriptions, fitted on ``--fit-photos`` training photos per domain; saves the
    ``--save-codec-subquantizers`` codec when asked."""
    net = model.net
    cells, fitted_on = training_cells(model, args.fit_photos, SEED)
    pooled_cells, pooled_from = training_cells(model, args.fit_photos, SEED, pool=True)
    fitted_on["command"] = command_line()
    codecs = {m: DescriptionCodec.fit(cells, net.config.embed_dim, m, fitted_on=fitted_on) for m in (64, 32, 16)}
    if args.save_codec:
        log(f"saved the {args.save_codec_subquantizers}-slice codec in {codecs[args.save_codec_subquantizers].save(args.save_codec)}")
    candidates = [Candidate("full: projections, float16 (a model without a codec)", full),
                  Candidate("(a) signature, float16", signature_float16),
                  Candidate("(b) cells int8, a float16 scale per cell", cells_int8),
                  *[Candidate(f"(c) cells PCA {dims}-d, int8", pca_int8(*principal_axes(cells, dims))) for dims in (64, 32)],
                  *[Candidate(f"(d) cells PQ {m}×8 bits", product_quantiser(codec)) for m, codec in codecs.items()],
                  Candidate("(e) 7×7 cells, int8", pooled_int8),
                  Candidate("(e) 7×7 cells, PQ 32×8 bits", product_quantiser(
                      DescriptionCodec.fit(pooled_cells, net.config.embed_dim, 32, fitted_on=pooled_from), pool=True))]
    return candidates, cells


def codec_study(model: SimilarityModel, args: argparse.Namespace) -> tuple[list[Candidate], Tensor]:
    """The full descriptions and the 32-slice codec fitted four ways (photos × rotation); saves the
    ``--save-codec-fit`` one when asked."""
    embed_dim = model.net.config.embed_dim
    samples = {"": training_cells(model, args.fit_photos, SEED), "-more": training_cells(model, args.more_fit_photos, SEED)}
    codecs = {}
    for suffix, (cells, fitted_on) in samples.items():
        fitted_on["command"] = command_line()
        for rotate in (False, True):
            started = time.time()
            codecs[("OPQ" if rotate else "PQ") + suffix] = codec = DescriptionCodec.fit(cells, embed_dim, 32, rotate=rotate, fitted_on=fitted_on)
            log(f"{codec.name} on {len(cells)} cells fitted in {time.time() - started:.0f} s")
    for key, codec in codecs.items():
        codec.save(BENCH_DIR / "codecs" / key)
    if args.save_codec:
        log(f"saved the {args.save_codec_fit} codec in {codecs[args.save_codec_fit].save(args.save_codec)}")
    candidates = [Candidate("full: projections, float16", full)]
    for key, codec in codecs.items():
        photos = args.more_fit_photos if key.endswith("-more") else args.fit_photos
        candidates.append(Candidate(f"{codec.name}: {photos} photos a domain, {codec.fitted_on['cells']} cells", product_quantiser(codec)))
    return candidates, samples[""][0]


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def catalogue_bytes(model: SimilarityModel, photos: int, batch_size: int) -> tuple[str, str]:
    """Bytes per item of a catalogue of ``photos`` AirBnB photos (a seeded sample) whose descriptions are
    float16 projections, compact descriptions indexed afresh, and the former converted by an index run."""
    if model.codec is None:
        sys.exit("--catalogue compares a model's codec with its float16 projections: the model has no codec")
    data = load_labelled_images(shared_data("airbnb"))
    chosen = np.sort(np.random.default_rng([SEED, 11]).choice(len(data.paths), size=min(photos, len(data.paths)), replace=False))
    full_model = SimilarityModel(model.net, model.config, model.batch_size, model.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="whymatch-compact-") as tmp:
        work = Path(tmp)
        listing = work / "photos.csv"
        listing.write_text("".join(f"{data.paths[c].resolve()}\n" for c in chosen))

        def measured(name: str, catalogue: Catalogue, seconds: float, recoded: int = 0) -> None:
            with catalogue.db.session() as session:
                ids = crud.embedded_ids(session, catalogue.model_key)
                description = len(catalogue.db.vectors.descriptions(session, ids[:1].tolist(), catalogue.model_key)[int(ids[0])])
            catalogue.db.dispose()
            n, size = len(ids), directory_bytes(catalogue.data_dir)
            parts = [directory_bytes(catalogue.data_dir / "vectors"), directory_bytes(catalogue.data_dir / "index")]
            parts.insert(0, size - sum(parts))
            rows.append([name, n, f"{size:,}", f"{size / n:,.0f}", " / ".join(f"{part / n:,.0f}" for part in parts), f"{description:,}",
                         f"{seconds:.0f} s" + (f" ({recoded} converted)" if recoded else "")])
            log(f"{name}: {n} items, {size:,} bytes")

        for name, which, folder in (("float16 projections (no codec)", full_model, "full"), (f"compact, {model.codec.name} codec", model, "compact")):
            catalogue = Catalogue(work / folder / "data", model=which, batch_size=batch_size, log=None)
            started = time.time()
            catalogue.index(listing)
            measured(name, catalogue, time.time() - started)
        shutil.copytree(work / "full", work / "converted")
        catalogue = Catalogue(work / "converted" / "data", model=model, batch_size=batch_size, log=None)
        started = time.time()
        report = catalogue.index(listing)
        measured("float16 projections converted by the next index run", catalogue, time.time() - started, report.recoded)
    table = markdown_table(["catalogue", "items", "data directory, bytes", "bytes / item", "database / vector shards / FAISS, bytes / item",
                            "description, bytes", "index run"], rows)
    notes = (f"{len(chosen)} AirBnB photos (a seeded sample of the {len(data.paths)} in ../shared/data/airbnb), indexed from a CSV into a fresh "
             f"data directory each (`Catalogue.index`, batches of {batch_size}), by the shipped model without and with its "
             f"description codec; the third row is the first catalogue after an index run with the codec converted its stored "
             f"projections (no photo read; the old shards deleted; its index folder still keeps the previous generation's file, "
             f"as every run keeps the last two). Bytes per item: the whole data directory over the items, and its three parts: "
             f"the SQLite database with its WAL (file metadata), the vector shards (Parquet: float16 embeddings and descriptions), "
             f"the FAISS index (float32 vectors and ids).")
    return table, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_option(parser)
    parser.add_argument("--pairs", type=int, default=5000, help="random pairs of different photos per domain")
    parser.add_argument("--per-domain", type=int, default=150, help="held-apart photos per domain that get an edited copy")
    parser.add_argument("--copy-negatives", type=int, default=40, help="copy-other pairs drawn per copy for the copy pair AUC")
    parser.add_argument("--fit-photos", type=int, default=100, help="training photos per domain whose cells fit the PCA bases and PQ codebooks")
    parser.add_argument("--threads", type=int, default=0, help="torch and FAISS threads (0: their defaults)")
    parser.add_argument("--record", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--save-codec", type=Path, help="also save the benchmarked product quantiser of --save-codec-subquantizers here")
    parser.add_argument("--save-codec-subquantizers", type=int, choices=(64, 32, 16), default=32, help="slices per cell of the saved codec")
    parser.add_argument("--codec-study", action="store_true", help="compare fits of the 32-slice codec instead (more photos, OPQ)")
    parser.add_argument("--more-fit-photos", type=int, default=400, help="--codec-study: the larger sample of training photos per domain")
    parser.add_argument("--catalogue", type=int, default=0, help="measure bytes per item of a catalogue of this many AirBnB photos instead")
    parser.add_argument("--save-codec-fit", choices=("PQ", "OPQ", "PQ-more", "OPQ-more"), default="PQ",
                        help="--codec-study: which fit --save-codec saves")
    args = parser.parse_args()
    if args.threads:
        import faiss  # defers FAISS, as engine.nn.compact does

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    started = time.time()
    model = load_bench_model(args.model)
    if args.catalogue:
        table, notes = catalogue_bytes(model, args.catalogue, batch_size=32)
        print(table + "\n\n" + notes)
        if args.record:
            log(f"recorded in {record('compact-catalogue', command_line(), table, notes)}")
        return
    net = model.net
    if not isinstance(net, MatchNet):
        sys.exit("compact descriptions store the whymatch preset's signature: the model must be a whymatch model")
    if args.codec_study:
        candidates, cells = codec_study(model, args)
    else:
        candidates, cells = all_candidates(model, args)
    log(f"candidates fitted after {time.time() - started:.0f} s")

    # The held-apart photos and their copies, as trust.py makes them (same seeds, so the same copies).
    copy_rng, strata_rng = np.random.default_rng([SEED, 0]), np.random.default_rng([SEED, 1])
    held: dict[str, LabelledImages] = {name: held_apart(name) for name in DOMAINS}

    def fmaps(paths: list[Path]) -> Tensor:
        return cached_features(model, paths, BENCH_DIR / "features", with_flips=False, progress=sys.stderr.isatty()).features

    maps = {name: fmaps(data.paths) for name, data in held.items()}
    gallery = torch.cat([maps[name] for name in DOMAINS])
    identities = {name: np.array(data.groups if data.form == "groups" else file_identities(data.paths)) for name, data in held.items()}
    gallery_groups, _, originals, copy_paths = held_apart_copies(held, args.per_domain, copy_rng)
    copy_maps = fmaps(copy_paths)
    copy_groups = [gallery_groups[o] for o in originals]
    strata = {name: random_pairs(len(ids), None, args.pairs, strata_rng, lambda i, j, ids=ids: ids[i] != ids[j])
              for name, ids in identities.items()}
    log(f"feature maps ready after {time.time() - started:.0f} s")

    sets = {**maps, "gallery": gallery, "copies": copy_maps}
    with torch.inference_mode():
        exact = {name: signatures(net, fmaps, CHUNK) for name, fmaps in sets.items()}
    emb = {name: signature[0] for name, signature in exact.items()}
    results: dict[str, dict] = {}
    for candidate in candidates:
        t0 = time.time()
        described = Described(net, candidate, sets, exact)
        airbnb = airbnb_quality(described, emb["airbnb"], held["airbnb"].groups)
        copies = copy_quality(described, emb["copies"], emb["gallery"], originals, gallery_groups, copy_groups, args.copy_negatives)
        within = {name: described.pairs(name, i, name, j) for name, (i, j) in strata.items()}
        results[candidate.name] = {"bytes": candidate.item_bytes, "airbnb": airbnb, "copies": copies, "within": within,
                                   "decisions": np.concatenate([airbnb["scores"], *within.values()]) >= model.threshold}
        log(f"{candidate.name}: {candidate.item_bytes} B, AirBnB R@1 {airbnb['recall@1']:.4f} AUC {airbnb['pair_auc']:.4f}, "
            f"copies R@1 {copies['recall@1']:.4f} AUC {copies['pair_auc']:.4f} ({time.time() - t0:.0f} s)")

    reference = results[candidates[0].name]
    n_decisions = len(reference["decisions"])
    rows = []
    for name, r in results.items():
        fmr = [f"{100 * (s >= model.threshold).mean():.3f}% ({int((s >= model.threshold).sum())})" for s in r["within"].values()]
        within_bounds = (r["bytes"] <= MAX_BYTES and r["airbnb"]["recall@1"] >= reference["airbnb"]["recall@1"] - MAX_DROP
                         and r["airbnb"]["pair_auc"] >= reference["airbnb"]["pair_auc"] - MAX_DROP)
        rows.append([name, f"{r['bytes']:,}", r["airbnb"]["recall@1"], f"{r['airbnb']['pair_auc']:.4f}", r["copies"]["recall@1"],
                     f"{r['copies']['pair_auc']:.4f}", *fmr, int((r["decisions"] != reference["decisions"]).sum()), "yes" if within_bounds else "no"])
    table = markdown_table(["description", "bytes / item", "AirBnB R@1", "AirBnB pair AUC", "copy R@1", "copy pair AUC",
                            *[f"false matches, {name}" for name in DOMAINS], f"decisions changed (of {n_decisions})",
                            f"≤ {MAX_BYTES} B, R@1 and AUC within {MAX_DROP}"], rows)
    held_line = ", ".join(f"{name} {len(held[name])}" for name in DOMAINS)
    notes = (f"Shipped model, threshold {model.threshold:.4f}. Held-apart photos (`split(data, 0.3, seed=0)[1]`): {held_line}. "
             f"AirBnB: R@1 of the top {RERANK_K} by the float32 embedding re-scored by the head from each description; pair AUC over "
             f"all {len(reference['airbnb']['scores'])} pairs. Copies: {len(originals)} (as benchmarks/trust.py), among "
             f"{len(gallery)} photos, {args.copy_negatives} copy–other pairs each for the AUC. False matches: {args.pairs} random "
             f"pairs of different photos per domain, the share (and count) scoring at or above the threshold. Decisions changed: "
             f"AirBnB pairs and those random pairs whose match decision differs from the full descriptions'. Bytes include the "
             f"float16 embedding (512 B; the head's cosine term) and, for PQ, the 2-byte grid and the float16 norms explanations "
             f"need (`projection_norms`: 2 B an image and 2 B a cell). ")
    if args.codec_study:
        notes += (f"The 32-slice product quantiser (8 bits per slice, FAISS k-means, every cell used) fitted on the cells of "
                  f"{args.fit_photos} or {args.more_fit_photos} training photos per domain (`split(data, 0.3, seed=0)[0]`, as "
                  f"many as it holds), without or with an OPQ rotation learned first (FAISS `OPQMatrix`, on a sample of "
                  f"{OPQ_CELLS} cells).")
    else:
        notes += (f"PCA bases and PQ codebooks (8 bits per slice, FAISS k-means) fitted on the cells of {args.fit_photos} "
                  f"training photos per domain (`split(data, 0.3, seed=0)[0]`, {len(cells)} cells).")
    notes += f" Whole run {time.time() - started:.0f} s."
    print(table + "\n\n" + notes)
    if args.record:
        section = "compact-codec-fit" if args.codec_study else "compact-descriptions"
        log(f"recorded in {record(section, command_line(), table, notes)}")


if __name__ == "__main__":
    main()
