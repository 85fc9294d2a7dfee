"""Duplicate listing detection over the whole catalogue.

1. **Candidates** from a FAISS k-nearest-neighbour graph: every item's ``k`` nearest neighbours,
   searched in batches of embeddings streamed from the database (memory O(N·k), never N×N), plus
   every pair of byte-identical items (same sha256, which need no scoring: head score 1).
2. **Re-scoring** of each candidate pair by the full Siamese head, from the head descriptions stored
   at indexing time (no file is decoded, no backbone runs). Descriptions are read in batches and kept
   in an LRU cache of bounded size (``max_cache_bytes``); pairs are visited in item order so most are
   reused.
3. **Threshold**: given (``threshold``), or calibrated for a target ``precision`` on labelled pairs
   (a ``path,group`` CSV such as ``groups.csv``, and reviewers' accept/reject decisions, which take
   precedence) with ``engine.eval.metrics.threshold_for_precision`` on the candidate pairs themselves —
   so the precision is that of what dedup outputs. A calibration is stored per model and used by
   later runs that give neither. Without one, the threshold holds at the catalogue's size
   (``threshold_for_catalogue``): unrelated pairs grow as N² and duplicates as N, so a threshold
   placed on a few hundred photos lets in more false pairs the larger the catalogue. The model's
   per-pair false-match rates (``ModelConfig.false_match_table``) give the false pairs expected at each
   threshold among the catalogue's N(N−1)/2 pairs; the lowest threshold whose expected false pairs are at
   most 1 − ``precision`` (default ``DEFAULT_PRECISION``) of the pairs it keeps is taken, never below
   the model's decision threshold. A model without the table falls back to its duplicate threshold.
4. **Geometry**: the candidate pairs just below the threshold (from ``verify_floor``, the score 1% of
   pairs of different photos reach) are verified geometrically, and a verified pair is kept whatever its
   score: the decision's second tier (``engine.explain.decision``). The head's threshold at catalogue
   size must be strict, because its false matches grow with N² (different skin lesions or flowers that
   look alike), while geometric verification does not confuse different photos; so verification gives
   back the duplicates the strict threshold loses.
5. **Groups** that cannot chain (``anchored_groups``): each is anchored on one photo, every member
   matches the anchor and at least half of the group's other members, so one weak link never merges
   two listings (connected components of the kept pairs chained a whole catalogue of rooms into one
   group). Only the pairs inside a group are reported; the **listing report** is built from those,
   so it follows the same rule: which listings share photos, how many, strongest evidence first.
   Everything is stored in the database (``dedup_runs``, ``duplicate_groups``, ``duplicate_pairs``)
   for review.
"""

from __future__ import annotations

import csv
import os
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from engine.errors import ImageLoadError
from engine.eval.metrics import threshold_for_precision
from engine.explain.decision import VERIFY_MODEL, is_verified, query_keypoints, verify_keypoints
from engine.verify import MIN_INLIERS, Keypoints, extract
from indexer import crud
from indexer import faiss_index as fx
from indexer.catalogue import read_indexed
from indexer.db import Database
from indexer.model import CatalogueModel
from indexer.models import as_utc

# The precision dedup aims at when nothing else says (no threshold, labels or stored calibration).
DEFAULT_PRECISION = 0.9
# The per-pair false-match rate whose threshold is the lowest score dedup verifies geometrically (``verify_floor``).
VERIFY_FLOOR_RATE = 0.01
MAX_EXACT_CLIQUE = 50  # larger sets of identical files are linked as a star, not every pair
SUMMARY_GROUPS = 20  # duplicate groups the text summary lists (all are in --json / --csv)


@dataclass
class DedupOptions:
    k: int = 10
    threshold: float | None = None
    precision: float | None = None
    labels: str | os.PathLike | None = None  # CSV path,group (relative paths: to the CSV's folder)
    min_index_similarity: float | None = None  # skip candidate pairs below this before re-scoring
    # A group member matches its anchor and at least this fraction of the members before it (``anchored_groups``).
    min_links: float = 0.5
    # Verify candidate pairs scored in [verify_floor, threshold) geometrically and keep the verified ones (the
    # decision's second tier); verify_floor None: the score 1% of pairs of different photos reach (the model's
    # false-match table), else the model's decision threshold.
    verify: bool = True
    verify_floor: float | None = None
    pair_batch: int = 256
    max_cache_bytes: int = 1 << 30


@dataclass
class PairResult:
    item_a: int
    item_b: int
    source_a: str
    source_b: str
    listing_a: str | None
    listing_b: str | None
    index_similarity: float
    head_score: float
    exact: bool
    verified: bool = False  # geometrically verified: kept below the threshold on that evidence
    group: int = -1  # position in DedupReport.groups
    review: str | None = None  # latest reviewer decision on this pair, if any


@dataclass
class GroupResult:
    items: list[int]
    sources: list[str]
    listings: list[str]
    max_score: float
    n_pairs: int
    id: int | None = None


@dataclass
class ListingShare:
    listing_a: str
    listing_b: str
    n_pairs: int
    photos_a: int  # distinct photos of listing a in these pairs
    photos_b: int
    n_exact: int
    max_score: float
    mean_score: float


@dataclass
class DedupReport:
    threshold: float
    threshold_source: str  # "given", "calibrated", "stored calibration", "model duplicates" or "model"
    precision_target: float | None
    k: int
    n_items: int
    n_candidates: int
    pairs: list[PairResult]
    groups: list[GroupResult]
    listings: list[ListingShare]
    calibration: dict | None = None
    expected_false_pairs: float | None = None  # at the threshold, from the model's per-pair false-match rate
    n_verify_checked: int | None = None  # candidate pairs below the threshold verified geometrically (None: not asked)
    n_verified: int | None = None  # of those, how many verified
    run_id: int | None = None
    seconds: float | None = 0.0  # None for a run read back from the database (``stored_report``)
    created_at: str | None = None  # ISO 8601, UTC

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.n_items} items, {self.n_candidates} candidate pairs (k={self.k}); threshold {self.threshold:.4f} "
            f"({self.threshold_source}); {len(self.pairs)} duplicate pairs in {len(self.groups)} groups "
            f"(run {self.run_id}{f', {self.seconds:.1f} s' if self.seconds is not None else f' of {self.created_at}, stored'})",
        ]
        if self.expected_false_pairs is not None:
            lines.append(f"aims at precision {self.precision_target:g}: {self.expected_false_pairs:.1f} false pairs expected "
                         f"among the {self.n_items * (self.n_items - 1) // 2} pairs of {self.n_items} items "
                         f"(the model's false-match rate per pair at this threshold)")
        if self.n_verify_checked:
            lines.append(f"geometry: {self.n_verified} of the {self.n_verify_checked} candidate pairs just below the threshold "
                         f"verified (≥ {MIN_INLIERS[VERIFY_MODEL]} homography inliers), kept as duplicates")
        if self.calibration:
            c = self.calibration
            lines.append(f"calibrated for precision {c['precision_target']:g} on {c['n_pairs']} labelled pairs "
                         f"({c['n_positive']} duplicates): recall {c['recall']:.3f}")
        if self.groups:
            shown = sorted(self.groups, key=lambda g: (-g.max_score, -len(g.items)))[:SUMMARY_GROUPS]
            lines.append(f"duplicate groups (highest score first{'' if len(shown) == len(self.groups) else f', {len(shown)} shown'}):")
            for group in shown:
                lines.append(f"  max {group.max_score:.3f}: " + ", ".join(group.sources))
        if self.listings:
            lines.append("listings sharing photos (strongest evidence first):")
            for share in self.listings[:50]:
                lines.append(f"  {share.listing_a} ~ {share.listing_b}: {share.n_pairs} pairs "
                             f"({share.photos_a}/{share.photos_b} photos, {share.n_exact} identical), "
                             f"max {share.max_score:.3f}, mean {share.mean_score:.3f}")
        return "\n".join(lines)

    CSV_FIELDS = ("group", "item_a", "item_b", "source_a", "source_b", "listing_a", "listing_b",
                  "index_similarity", "head_score", "exact", "verified", "review")

    def csv_rows(self) -> list[dict]:
        return [{name: getattr(p, name) for name in self.CSV_FIELDS} for p in self.pairs]


# ------------------------------------------------------------------------------------ candidates


Candidates = Callable[[Database, fx.CatalogueIndex, str, int, set[int]], dict[tuple[int, int], float]]
"""What finds the candidate pairs: (db, index, model key, k, valid ids) → pairs (``knn_candidates``)."""
Rescorer = Callable[..., dict[tuple[int, int], float]]
"""What re-scores them: (model, pairs, options, db=, model_key=) → head scores (``rescore``)."""
Verifier = Callable[[list[tuple[int, int]], Mapping[int, tuple[str, str]]], set[tuple[int, int]]]
"""What verifies pairs geometrically: (pairs, item id → (source, sha256)) → the verified pairs (``verify_pairs``)."""


def neighbour_block(index: fx.CatalogueIndex, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of the ``k`` nearest neighbours of a block of items (each finds itself too)."""
    return fx.search(index, vectors, k + 1, ef_search=fx.GRAPH_EF_SEARCH)


def add_neighbours(pairs: dict[tuple[int, int], float], ids: np.ndarray, sims: np.ndarray, neighbours: np.ndarray,
                   valid: set[int]) -> None:
    """Merge one block's neighbours into ``pairs`` ((a, b) with a < b → the best index similarity seen)."""
    for row, a in enumerate(ids.tolist()):
        for b, sim in zip(neighbours[row].tolist(), sims[row].tolist()):
            if b < 0 or b == a or b not in valid:
                continue
            key = (a, b) if a < b else (b, a)
            if sim > pairs.get(key, -np.inf):
                pairs[key] = float(sim)


def knn_candidates(db: Database, index: fx.CatalogueIndex, model_key: str, k: int, valid: set[int]) -> dict[tuple[int, int], float]:
    """(a, b) with a < b → index similarity, for every item's k nearest neighbours."""
    pairs: dict[tuple[int, int], float] = {}
    with db.session() as session:
        for ids, vectors in db.vectors.iter_embeddings(session, model_key):
            add_neighbours(pairs, ids, *neighbour_block(index, vectors, k), valid)
    return pairs


def exact_pairs(by_sha: dict[str, list[int]]) -> set[tuple[int, int]]:
    pairs: set[tuple[int, int]] = set()
    for ids in by_sha.values():
        ids = sorted(ids)
        if len(ids) < 2:
            continue
        if len(ids) <= MAX_EXACT_CLIQUE:
            pairs.update((a, b) for n, a in enumerate(ids) for b in ids[n + 1 :])
        else:
            pairs.update((ids[0], b) for b in ids[1:])
    return pairs


# ------------------------------------------------------------------------------------ re-scoring


class _DescriptionCache:
    """Packed head descriptions by item id, read from the vector shards; least recently used dropped first."""

    def __init__(self, db: Database, model_key: str, max_bytes: int, min_entries: int) -> None:
        self.db, self.model_key = db, model_key
        self.max_bytes, self.min_entries = max_bytes, min_entries
        self.descriptions: OrderedDict[int, bytes] = OrderedDict()
        self.size = 0

    def ensure(self, ids: list[int]) -> None:
        missing = [i for i in dict.fromkeys(ids) if i not in self.descriptions]
        with self.db.session() as session:
            found = self.db.vectors.descriptions(session, missing, self.model_key) if missing else {}
        for item_id, blob in found.items():
            self.descriptions[item_id] = blob
            self.size += len(blob)
        for item_id in ids:
            if item_id in self.descriptions:
                self.descriptions.move_to_end(item_id)
        while self.size > self.max_bytes and len(self.descriptions) > self.min_entries:
            self.size -= len(self.descriptions.popitem(last=False)[1])


def rescore(model: CatalogueModel, pairs: list[tuple[int, int]], options: DedupOptions, *, db: Database,
            model_key: str) -> dict[tuple[int, int], float]:
    """Head scores of ``pairs`` (sorted by item) from the descriptions stored by ``model_key``."""
    batch = max(1, options.pair_batch)
    cache = _DescriptionCache(db, model_key, options.max_cache_bytes, min_entries=2 * batch)
    scores: dict[tuple[int, int], float] = {}
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        cache.ensure([i for pair in chunk for i in pair])
        scores.update(zip(chunk, score_pairs(model, chunk, cache.descriptions, batch)))
    return scores


def score_pairs(model: CatalogueModel, pairs: Sequence[tuple[int, int]], descriptions: Mapping[int, bytes], batch: int) -> list[float]:
    """Head scores of ``pairs`` from their items' packed ``descriptions``, ``batch`` pairs per pass."""
    scores: list[float] = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        head = model.score_described([descriptions[a] for a, _ in chunk], [descriptions[b] for _, b in chunk])
        scores.extend(float(score) for score in head.tolist())
    return scores


# ------------------------------------------------------------------------------------ labels and threshold


def read_labels(path: str | os.PathLike, sources: dict[int, str]) -> dict[int, str]:
    """item id → group from a ``path,group`` CSV (paths relative to the CSV's folder, or absolute)."""
    path = Path(path)
    base = Path(os.path.abspath(path)).parent  # as the catalogue names sources: symlinks kept
    by_source = {source: item_id for item_id, source in sources.items()}
    labels: dict[int, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "path" not in reader.fieldnames or not ({"group", "listing"} & set(reader.fieldnames)):
            raise ValueError(f"{path}: expected a header with columns 'path,group'")
        column = "group" if "group" in reader.fieldnames else "listing"
        for row in reader:
            if not row.get("path") or not row.get(column):
                continue
            item_id = by_source.get(os.path.abspath(base / row["path"].strip()))
            if item_id is not None:
                labels[item_id] = row[column].strip()
    return labels


def calibrate(scores: dict[tuple[int, int], float], labels: dict[int, str], reviews: dict[tuple[int, int], str],
              precision: float) -> dict:
    """The lowest threshold reaching ``precision`` on the labelled candidate pairs."""
    s, y = [], []
    for pair, score in scores.items():
        if pair in reviews:
            label = reviews[pair] == "accept"
        elif pair[0] in labels and pair[1] in labels:
            label = labels[pair[0]] == labels[pair[1]]
        else:
            continue
        s.append(score)
        y.append(int(label))
    s_arr, y_arr = np.asarray(s, np.float64), np.asarray(y, np.int64)
    if y_arr.sum() == 0:
        raise ValueError(f"no labelled duplicate among the {len(s)} labelled candidate pairs: cannot calibrate "
                         "(review some pairs, or give labels: a path,group CSV covering the catalogue, the CLI's --labels)")
    threshold = threshold_for_precision(s_arr, y_arr, precision)
    kept = s_arr >= threshold
    return {"precision_target": precision, "threshold": float(threshold), "n_pairs": int(len(s)),
            "n_positive": int(y_arr.sum()), "recall": float(y_arr[kept].sum() / y_arr.sum()),
            "precision": float(y_arr[kept].mean()) if kept.any() else 1.0}


# ------------------------------------------------------------------------------------ the run


def find_duplicates(*, model: CatalogueModel, db: Database, index: fx.CatalogueIndex, model_key: str,
                    generation_id: int | None = None, options: DedupOptions | None = None,
                    candidates: Candidates = knn_candidates, rescorer: Rescorer = rescore,
                    verifier: Verifier | None = None) -> DedupReport:
    """Find, score, group and store the catalogue's duplicates (see the module's docstring). ``candidates``,
    ``rescorer`` and ``verifier`` do steps 1, 2 and 4, in this process by default (on a Ray cluster:
    ``indexer.distributed``)."""
    options = options or DedupOptions()
    if options.threshold is not None and options.precision is not None:
        raise ValueError("give either a threshold or a precision target, not both")
    started = time.perf_counter()
    with db.session() as session:
        rows = crud.embedded_item_keys(session, model_key)
        reviews = crud.latest_reviews(session)
    sources = {item_id: source for item_id, source, _, _ in rows}
    listings = {item_id: listing for item_id, _, listing, _ in rows}
    sha_of = {item_id: sha256 for item_id, _, _, sha256 in rows}
    by_sha: dict[str, list[int]] = defaultdict(list)
    for item_id, sha256 in sha_of.items():
        by_sha[sha256].append(item_id)

    found = candidates(db, index, model_key, options.k, set(sources)) if rows else {}
    identical = exact_pairs(by_sha)
    for pair in identical:
        found.setdefault(pair, 1.0)
    to_score = sorted(p for p, sim in found.items()
                      if sha_of[p[0]] != sha_of[p[1]] and (options.min_index_similarity is None or sim >= options.min_index_similarity))
    head = rescorer(model, to_score, options, db=db, model_key=model_key)
    scores = {p: 1.0 for p in found if sha_of[p[0]] == sha_of[p[1]]}
    scores.update(head)

    calibration = expected_false = None
    precision = options.precision
    table = model.config.false_match_table
    stored = None
    if options.threshold is None and options.precision is None:
        with db.session() as session:
            stored = crud.latest_calibration(session, model_key)
    if options.threshold is not None:
        threshold, how = float(options.threshold), "given"
    elif options.precision is not None and (options.labels or reviews or not table):
        labels = read_labels(options.labels, sources) if options.labels else {}
        calibration = calibrate(scores, labels, reviews, options.precision)
        calibration["labels"] = os.path.abspath(options.labels) if options.labels else None
        threshold, how = calibration["threshold"], "calibrated"
    elif stored is not None:
        threshold, how = stored.threshold, "stored calibration"
    elif table:
        precision = precision if precision is not None else DEFAULT_PRECISION
        threshold, expected_false = threshold_for_catalogue(table, list(scores.values()), len(rows), float(model.threshold), precision)
        how = "false-match rate"
    else:  # the model's duplicate threshold, which falls back to its decision threshold
        threshold = float(model.duplicate_threshold)
        how = "model duplicates" if model.config.duplicate_threshold is not None else "model"

    verified: set[tuple[int, int]] = set()
    checked = None
    if options.verify:
        floor = options.verify_floor if options.verify_floor is not None else verify_floor(model)
        to_verify = sorted(p for p, score in scores.items() if floor <= score < threshold)
        files = {item: (sources[item], sha_of[item]) for pair in to_verify for item in pair}
        verified = (verifier or verify_pairs)(to_verify, files) if to_verify else set()
        checked = len(to_verify)
    above = {p: score for p, score in scores.items() if score >= threshold or p in verified}
    groups = anchored_groups(above, options.min_links)
    group_of = {item: n for n, members in enumerate(groups) for item in members}
    kept = sorted((p for p in above if group_of.get(p[0], -1) == group_of.get(p[1], -2)), key=lambda p: (-scores[p], p))
    pairs = [PairResult(a, b, sources[a], sources[b], listings[a], listings[b], found[(a, b)], scores[(a, b)],
                        sha_of[a] == sha_of[b], (a, b) in verified, group_of[a], reviews.get((a, b))) for a, b in kept]
    pairs_of: dict[int, list[PairResult]] = defaultdict(list)
    for p in pairs:
        pairs_of[p.group].append(p)
    group_results = []
    for n, members in enumerate(groups):
        member_pairs = pairs_of[n]
        group_results.append(GroupResult(sorted(members), [sources[i] for i in sorted(members)],
                                         sorted({listings[i] for i in members if listings[i] is not None}),
                                         max(p.head_score for p in member_pairs), len(member_pairs)))
    report = DedupReport(threshold, how, precision, options.k, len(rows), len(found), pairs, group_results,
                         listing_report(pairs), calibration, expected_false, checked, len(verified) if checked is not None else None)
    _store(db, report, model_key, generation_id)
    report.seconds = time.perf_counter() - started
    return report


def verify_floor(model: CatalogueModel) -> float:
    """The lowest head score dedup verifies by default: the score 1% of pairs of different photos reach
    (``VERIFY_FLOOR_RATE`` in the model's false-match table), else the model's decision threshold. Below it
    a pair is rarely a duplicate, and every verified pair costs a SIFT extraction of both photos."""
    table = model.config.false_match_table
    if table:
        return float(min(table, key=lambda row: abs(np.log(row[0] / VERIFY_FLOOR_RATE)))[1])
    return float(model.threshold)


def verify_pairs(pairs: list[tuple[int, int]], files: Mapping[int, tuple[str, str]]) -> set[tuple[int, int]]:
    """The pairs whose photos geometrically verify (``engine.explain.decision``: ≥ 8 homography inliers, the
    first photo also tried mirrored); each photo's keypoints extracted once, from its file (``files``: item id
    → (source, sha256)) as it was indexed. A photo that no longer decodes, or whose file changed, verifies
    nothing."""
    first = {a for a, _ in pairs}  # the side tried mirrored: described with its mirror image, which b ignores
    keys: dict[int, Keypoints | None] = {}

    def keypoints(item: int) -> Keypoints | None:
        if item not in keys:
            try:
                data = read_indexed(*files[item])
                keys[item] = query_keypoints(data) if item in first else extract(data)
            except ImageLoadError:
                keys[item] = None
        return keys[item]

    verified = set()
    for a, b in pairs:
        ka, kb = keypoints(a), keypoints(b)
        if ka is not None and kb is not None and is_verified(verify_keypoints(ka, kb)):
            verified.add((a, b))
    return verified


def threshold_for_catalogue(table: list[list[float]], scores: list[float], n_items: int, floor: float,
                            precision: float) -> tuple[float, float]:
    """(threshold, false pairs expected there) for a catalogue of ``n_items``: the lowest threshold of
    ``table`` ([[per-pair false-match rate, threshold], ...]) at which the expected false pairs, rate ×
    N(N−1)/2, are at most 1 − ``precision`` of the candidate pairs (``scores``) it keeps; never below
    ``floor`` (the model's decision threshold: what dedup reports, compare calls a match). When no row
    reaches the precision, the strictest."""
    n_pairs = n_items * (n_items - 1) / 2
    values = np.sort(np.asarray(scores, np.float64))
    rows = sorted(table, key=lambda row: row[1])
    for rate, threshold in rows:
        threshold = max(float(threshold), floor)
        kept = len(values) - int(np.searchsorted(values, threshold, side="left"))
        if kept and rate * n_pairs <= (1 - precision) * kept:
            return threshold, rate * n_pairs
    rate, threshold = rows[-1]
    return max(float(threshold), floor), rate * n_pairs


def anchored_groups(scores: dict[tuple[int, int], float], min_links: float = 0.5) -> list[set[int]]:
    """Groups of the items linked by ``scores`` ((a, b) → score of a kept pair) that cannot chain.

    Anchors are taken in order of their links (most first, then the highest summed score, then the
    smallest id); each unassigned anchor gathers its unassigned neighbours, strongest link first, a
    neighbour joining when it is linked to at least ``min_links`` of the members so far (the anchor
    always among them). Every member is one link from its anchor, so a group never grows along a chain
    of pairwise links; an item left alone is in no group. Groups come strongest first (their highest
    score)."""
    neighbours: dict[int, dict[int, float]] = defaultdict(dict)
    for (a, b), score in scores.items():
        neighbours[a][b] = neighbours[b][a] = score
    order = sorted(neighbours, key=lambda i: (-len(neighbours[i]), -sum(neighbours[i].values()), i))
    assigned: set[int] = set()
    groups: list[tuple[float, set[int]]] = []
    for anchor in order:
        if anchor in assigned:
            continue
        members = [anchor]
        for other, _ in sorted(neighbours[anchor].items(), key=lambda link: (-link[1], link[0])):
            if other not in assigned and sum(m in neighbours[other] for m in members) >= min_links * len(members):
                members.append(other)
        if len(members) > 1:
            assigned.update(members)
            strongest = max(neighbours[a][b] for a in members for b in members if b in neighbours[a])
            groups.append((strongest, set(members)))
    groups.sort(key=lambda group: (-group[0], min(group[1])))
    return [members for _, members in groups]


def listing_report(pairs: list[PairResult]) -> list[ListingShare]:
    """Pairs of different listings that share photos, strongest evidence first."""
    shared: dict[tuple[str, str], list[PairResult]] = defaultdict(list)
    for p in pairs:
        if p.listing_a is None or p.listing_b is None or p.listing_a == p.listing_b:
            continue
        shared[tuple(sorted((p.listing_a, p.listing_b)))].append(p)
    result = []
    for (la, lb), ps in shared.items():
        photos_a = {p.item_a if p.listing_a == la else p.item_b for p in ps}
        photos_b = {p.item_b if p.listing_b == lb else p.item_a for p in ps}
        scores = [p.head_score for p in ps]
        result.append(ListingShare(la, lb, len(ps), len(photos_a), len(photos_b), sum(p.exact for p in ps),
                                   max(scores), float(np.mean(scores))))
    result.sort(key=lambda s: (-s.max_score, -s.n_pairs, -s.n_exact, s.listing_a, s.listing_b))
    return result


def _store(db: Database, report: DedupReport, model_key: str, generation_id: int | None) -> None:
    with db.session() as session:
        if report.calibration is not None:
            crud.add_calibration(session, model_key, report.calibration)
        groups = [{"size": len(g.items), "n_listings": len(g.listings), "max_score": g.max_score} for g in report.groups]
        pairs = [{"group": p.group, "item_a_id": p.item_a, "item_b_id": p.item_b, "index_similarity": p.index_similarity,
                  "head_score": p.head_score, "exact": p.exact, "verified": p.verified} for p in report.pairs]
        run, group_ids = crud.add_dedup_run(
            session, groups, pairs, generation_id=generation_id, model_key=model_key, threshold=report.threshold,
            threshold_source=report.threshold_source, precision_target=report.precision_target, k=report.k,
            n_items=report.n_items, n_candidates=report.n_candidates, n_pairs=len(report.pairs), n_groups=len(report.groups),
            expected_false_pairs=report.expected_false_pairs, n_verify_checked=report.n_verify_checked,
            n_verified=report.n_verified)
        for group, group_id in zip(report.groups, group_ids):
            group.id = group_id
        report.run_id = run.id
        report.created_at = as_utc(run.created_at).isoformat(timespec="seconds")


def stored_report(db: Database, run_id: int | None = None) -> DedupReport | None:
    """A stored run (the newest unless ``run_id``) read back as ``find_duplicates`` reported it: its pairs
    strongest first, groups, listing report, and each pair's newest review as of now. None when there is
    no such run. What a run does not store reads as empty: the calibration's details. Items deleted from
    the catalogue since are left out with their pairs."""
    with db.session() as session:
        run = crud.latest_dedup_run(session) if run_id is None else crud.get_dedup_run(session, run_id)
        if run is None:
            return None
        reviews = crud.latest_reviews(session)
        group_order = [group.id for group in crud.dedup_groups(session, run.id)]
        rows = crud.stored_pair_rows(session, run.id)
        report = DedupReport(run.threshold, run.threshold_source, run.precision_target, run.k, run.n_items, run.n_candidates,
                             [], [], [], expected_false_pairs=run.expected_false_pairs, n_verify_checked=run.n_verify_checked,
                             n_verified=run.n_verified, run_id=run.id, seconds=None, created_at=as_utc(run.created_at).isoformat(timespec="seconds"))
    present = {group_id for group_id, *_ in rows}
    position = {group_id: n for n, group_id in enumerate(g for g in group_order if g in present)}
    report.pairs = [PairResult(*fields, position[group_id], reviews.get((fields[0], fields[1]))) for group_id, *fields in rows]
    members: dict[int, dict[int, tuple[str, str | None]]] = defaultdict(dict)
    scores: dict[int, list[float]] = defaultdict(list)
    for p in report.pairs:
        members[p.group].update({p.item_a: (p.source_a, p.listing_a), p.item_b: (p.source_b, p.listing_b)})
        scores[p.group].append(p.head_score)
    for group_id, n in position.items():
        items = sorted(members[n])
        report.groups.append(GroupResult(items, [members[n][i][0] for i in items],
                                         sorted({members[n][i][1] for i in items} - {None}), max(scores[n]), len(scores[n]), group_id))
    report.listings = listing_report(report.pairs)
    return report


def stored_listing_report(session: Session, run_id: int) -> list[ListingShare]:
    """The listing report of a stored run (as ``find_duplicates`` reported it), rebuilt from its pairs."""
    return listing_report([PairResult(*fields) for _, *fields in crud.stored_pair_rows(session, run_id)])
