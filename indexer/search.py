"""Query by image: FAISS candidates, re-scored by the full Siamese head, re-ranked, optionally explained.

The index similarity (cosine of the embeddings) is cheap but coarse; the head compares both images'
local features and is what the model's threshold is calibrated on. So more candidates than asked for
are fetched from FAISS (``candidates``, default ``max(4k, k + 20)``), each is re-scored against the
query from the head description stored with its embedding at indexing time, and the best ``k`` by head
score are returned with both ranks. Explanations (factual and counterfactual Grad-CAM maps of both
images, region correspondences) come from the same stored descriptions in one batched
``model.explain_described`` call: no match is decoded and no backbone runs again. Concepts and measured
effects need the matches' pixels: one backbone pass over the top ``k`` and ``model.explain_feature_maps``.
Overlay PNGs are written with ``engine.explain.figures.overlay``.

``verify`` also verifies the top ``k`` geometrically (``engine.explain.decision``): the query's SIFT keypoints
(with its mirror image's) are extracted once, each match's from its stored file (a file that no longer decodes
is noted in ``unreadable`` and its match left unverified), and each match's ``is_match`` becomes the tier
rule's: head score ≥ threshold *or* verified; verified matches rank first. It decodes every match again, ~45 ms each on 2 cores (and
~110 ms for the query), so it is off by default. Explanations then explain the final decisions.

The query is an image (``search``) or a catalogue item (``search_item``, "more like this"), whose stored
embedding and description stand in for the image: then not even the query is decoded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine import PairExplanation
from engine.errors import ImageLoadError
from engine.explain.decision import decided_by, query_keypoints, verify_keypoints
from engine.explain.figures import overlay
from engine.images import ImageSource, image_size
from engine.verify import extract
from indexer import crud
from indexer import faiss_index as fx
from indexer.catalogue import Skipped, read_indexed
from indexer.db import Database
from indexer.model import CatalogueModel, Picture

if TYPE_CHECKING:
    from torch import Tensor

OVERLAYS = {
    "query_factual": ("query", "factual_a"),
    "query_counterfactual": ("query", "counterfactual_a"),
    "match_factual": ("match", "factual_b"),
    "match_counterfactual": ("match", "counterfactual_b"),
}


@dataclass
class Match:
    item_id: int
    source: str
    listing: str | None
    sha256: str
    index_similarity: float  # cosine of the embeddings (negated L2 distance for the paper preset)
    head_score: float  # the Siamese head's calibrated similarity in (0, 1)
    is_match: bool  # head_score >= the model's threshold, or geometrically verified (``decided_by``)
    rank_before: int  # 1-based rank by index similarity among the candidates
    rank_after: int  # 1-based rank by head score
    explanation: PairExplanation | None = None
    overlays: dict[str, str] = field(default_factory=dict)
    verification: dict | None = None  # engine.explain.decision.summarise's dict, with ``verify``; else None
    decided_by: str | None = None  # "head", "geometry", "head and geometry"; None for no match

    def to_dict(self) -> dict:
        data = {k: getattr(self, k) for k in ("item_id", "source", "listing", "sha256", "index_similarity", "head_score",
                                              "is_match", "decided_by", "verification", "rank_before", "rank_after")}
        if self.explanation is not None:
            data["explanation"] = self.explanation.to_dict()
        if self.overlays:
            data["overlays"] = self.overlays
        return data


@dataclass
class SearchResult:
    query: str
    k: int
    threshold: float
    n_candidates: int
    matches: list[Match]
    excluded: list[int] = field(default_factory=list)  # catalogue items that are the query itself
    unreadable: list[Skipped] = field(default_factory=list)  # candidates whose file can no longer be decoded
    generation: int | None = None
    stale_index: bool = False
    query_item: int | None = None  # the catalogue item searched with ``search_item``
    query_sha256: str | None = None  # of the query's bytes, or of the item's file; None for a path query
    index_size: int = 0  # vectors in the FAISS index searched: 0 = nothing indexed with this model

    def to_dict(self) -> dict:
        return {
            "query": self.query, "query_item": self.query_item, "query_sha256": self.query_sha256, "k": self.k,
            "threshold": self.threshold,
            "n_candidates": self.n_candidates, "index_size": self.index_size,
            "excluded": self.excluded, "generation": self.generation, "stale_index": self.stale_index,
            "unreadable": [{"source": s.source, "reason": s.reason} for s in self.unreadable],
            "matches": [m.to_dict() for m in self.matches],
        }


def _query_identity(query: ImageSource) -> tuple[str, str | None, str | None]:
    """(display name, absolute source path or None, sha256 of bytes or None)."""
    if isinstance(query, (str, os.PathLike)):
        return os.fspath(query), os.path.abspath(query), None
    if isinstance(query, (bytes, bytearray, memoryview)):
        return "<bytes>", None, hashlib.sha256(bytes(query)).hexdigest()
    return f"<{type(query).__name__}>", None, None


class UnknownItemError(LookupError):
    """The catalogue holds no item with that id."""


@dataclass(frozen=True)
class SearchOptions:
    """How to search. ``explain_dir`` (implies ``explain``) receives four overlay PNGs per match:
    ``<rank>_item<id>_{query,match}_{factual,counterfactual}.png``. Explanations carry region
    correspondences; ``concepts`` (implies ``explain``) adds the ImageNet concepts the match rests on,
    ``effects`` (implies ``explain``) the measured effect of masking each map's region (both decode the
    matches: one backbone pass, plus four masked passes per match for the effects). ``verify`` verifies the
    top ``k`` geometrically, part of their decisions (decodes the query and each match: ~45 ms a match).
    ``exclude_self`` leaves out the catalogue items that are the query (see ``search`` and ``search_item``)."""

    k: int = 10
    candidates: int | None = None  # FAISS candidates re-scored by the head; default max(4k, k + 20)
    explain: bool = False
    explain_dir: str | os.PathLike | None = None
    method: str = "gradcam"
    effects: bool = False
    concepts: bool = False
    exclude_self: bool = True
    verify: bool = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")

    @property
    def explains(self) -> bool:
        return self.explain or self.explain_dir is not None or self.effects or self.concepts


@dataclass
class _Query:
    """What search needs of its query: the embedding FAISS ranks by and the head description the
    candidates are re-scored against. Its picture and feature map (for concepts, effects and overlays)
    come from ``source`` on first use: a catalogue item's query decodes nothing otherwise."""

    name: str
    vector: np.ndarray
    description: bytes
    size: tuple[int, int]  # (width, height) of the original image: correspondence boxes are in its pixels
    excluded: list[int]
    source: ImageSource
    sha256: str | None = None
    item_id: int | None = None
    picture: Picture | None = None
    fmap: Tensor | None = None
    indexed: bytes | None = None  # a catalogue item's file, once read (``image``)

    @classmethod
    def decoded(cls, model: CatalogueModel, source: ImageSource, name: str, excluded: list[int], sha256: str | None,
                size: tuple[int, int] | None = None, item_id: int | None = None) -> _Query:
        """A query from its image, decoded and run through the backbone once."""
        picture = model.load([source])[0]
        fmap = model.feature_maps([picture])
        return cls(name, model.embed_fmaps(fmap), model.describe_fmaps(fmap)[0], size or _original_size(source, picture),
                   excluded, source, sha256, item_id, picture, fmap)

    def image(self) -> ImageSource:
        """The query's image: a catalogue item's bytes as they were indexed (``read_indexed``), read once."""
        if self.item_id is None or self.sha256 is None or not isinstance(self.source, str):
            return self.source
        if self.indexed is None:
            self.indexed = read_indexed(self.source, self.sha256)
        return self.indexed

    def pixels(self, model: CatalogueModel) -> tuple[Picture, Tensor]:
        if self.picture is None:
            self.picture = model.load([self.image()])[0]
        if self.fmap is None:
            self.fmap = model.feature_maps([self.picture])
        return self.picture, self.fmap


def search(query: ImageSource, options: SearchOptions, *, model: CatalogueModel, db: Database, index: fx.CatalogueIndex,
           model_key: str, generation: int | None = None, stale_index: bool = False) -> SearchResult:
    """The best catalogue matches of ``query``, re-scored by the head from the descriptions stored by
    ``model_key``.

    ``exclude_self`` drops catalogue items that *are* the query: the same path for a path query,
    the same bytes (sha256) for a bytes query.
    """
    name, source, sha = _query_identity(query)
    excluded: list[int] = []
    if options.exclude_self and (source or sha):
        with db.session() as session:
            if source:
                excluded = list(crud.item_ids_by_source(session, [source]).values())
            else:
                excluded = crud.item_ids_by_sha(session, sha)
    return _search(_Query.decoded(model, query, name, excluded, sha), options, model=model, db=db, index=index,
                   model_key=model_key, generation=generation, stale_index=stale_index)


def search_item(item_id: int, options: SearchOptions, *, model: CatalogueModel, db: Database, index: fx.CatalogueIndex,
                model_key: str, generation: int | None = None, stale_index: bool = False) -> SearchResult:
    """"More like this": the ``k`` best matches of a catalogue item, from its stored embedding and head
    description, so no file is decoded and no backbone runs unless concepts, effects or overlays need
    its pixels. An item not yet embedded by this model is searched by its file. ``exclude_self`` drops
    the item itself (not its byte-identical copies: those are duplicates worth seeing).
    Raises ``UnknownItemError`` for an id the catalogue does not hold."""
    with db.session() as session:
        item = crud.get_item(session, item_id)
        if item is None:
            raise UnknownItemError(f"no catalogue item {item_id}")
        stored = db.vectors.rows(session, [item_id], model_key).get(item_id)
        source, size, sha256 = item.source, (item.width, item.height), item.sha256
    excluded = [item_id] if options.exclude_self else []
    if stored is not None:
        vector, description = stored
        resolved = _Query(source, vector[None, :].astype(np.float32), description, size, excluded, source, sha256, item_id)
    else:
        resolved = _Query.decoded(model, read_indexed(source, sha256), source, excluded, sha256, size, item_id)
    return _search(resolved, options, model=model, db=db, index=index, model_key=model_key, generation=generation,
                   stale_index=stale_index)


def _search(query: _Query, options: SearchOptions, *, model: CatalogueModel, db: Database, index: fx.CatalogueIndex, model_key: str,
            generation: int | None, stale_index: bool) -> SearchResult:
    """FAISS candidates of the query, re-scored and re-ranked by the head, optionally explained."""
    k, concepts, effects, explain_dir = options.k, options.concepts, options.effects, options.explain_dir
    wanted = options.candidates if options.candidates is not None else max(4 * k, k + 20)
    wanted = max(wanted, k)
    sims, ids = fx.search(index, query.vector, min(index.ntotal, wanted + len(query.excluded)))
    skip = set(query.excluded)
    order = [(int(i), float(s)) for i, s in zip(ids[0], sims[0]) if i >= 0 and int(i) not in skip]
    with db.session() as session:
        # A stale index may hold items since deleted or no longer embedded by this model: left out.
        stored = db.vectors.descriptions(session, [i for i, _ in order], model_key)
        order = [(i, s) for i, s in order if i in stored][:wanted]
        items = crud.items_by_ids(session, [i for i, _ in order])
    unreadable: list[Skipped] = []
    pictures: dict[int, Picture] = {}
    files: dict[int, bytes] = {}  # each match's file, read once: verification and pictures both need it
    described = [(i, s, stored[i]) for i, s in order]

    head = model.score_described([query.description] * len(described), [d for _, _, d in described])
    before = {item_id: rank for rank, (item_id, _, _) in enumerate(described, start=1)}
    ranked = sorted(range(len(described)), key=lambda n: (-head[n], n))[:k]
    matches = []
    for rank, n in enumerate(ranked, start=1):
        item_id, sim, _ = described[n]
        item = items[item_id]
        score = float(head[n])
        decided = decided_by(score, model.threshold)
        matches.append(Match(item_id, item.source, item.listing, item.sha256, sim, score, decided is not None,
                             before[item_id], rank, decided_by=decided))
    if options.verify and matches:
        _verify(query, matches, items, files, unreadable, float(model.threshold))
        # A verified match shows the same scene for certain: it ranks above the unverified, by head score
        # within each tier, so an edited copy's original comes first even when the head prefers a look-alike.
        matches.sort(key=lambda m: (not (m.verification or {}).get("verified", False), -m.head_score, m.rank_after))
        for rank, match in enumerate(matches, start=1):
            match.rank_after = rank

    if options.explains and matches:
        explained = matches
        if concepts or effects or explain_dir is not None:  # these need the matches' pixels
            explained = _with_pictures(model, matches, pictures, files, unreadable)
        if explained:
            # Boxes are in the original images' pixels: the catalogue stores each item's (EXIF-rotated) size.
            sizes = [query.size, *((items[m.item_id].width, items[m.item_id].height) for m in explained)]
            if concepts or effects:
                query_picture, query_fmap = query.pixels(model)
                match_pictures = [pictures[m.item_id] for m in explained]
                fmaps = model.feature_maps(match_pictures)
                explanations = model.explain_feature_maps(query_fmap, fmaps, method=options.method, correspondences=True,
                                                          concepts=concepts, sizes=sizes,
                                                          verifications=[m.verification for m in explained])
                if effects:
                    model.add_effects(query_picture, match_pictures, explanations, fmap_a=query_fmap, fmaps_b=fmaps)
            else:
                explanations = model.explain_described(query.description, [stored[m.item_id] for m in explained],
                                                       method=options.method, correspondences=True, sizes=sizes,
                                                       verifications=[m.verification for m in explained])
            for match, explanation in zip(explained, explanations):
                match.explanation = explanation
                if explain_dir is not None:
                    match.overlays = _write_overlays(Path(explain_dir), match, query.pixels(model)[0],
                                                     pictures[match.item_id], explanation)

    return SearchResult(query.name, k, float(model.threshold), len(described), matches, query.excluded, unreadable,
                        generation, stale_index, query_item=query.item_id, query_sha256=query.sha256,
                        index_size=int(index.ntotal))


def _verify(query: _Query, matches: list[Match], items: dict, files: dict[int, bytes], unreadable: list[Skipped],
            threshold: float) -> None:
    """Verify each match against the query geometrically and decide it by the tier rule: the query's
    keypoints (with its mirror image's) once, each match's from its file. A match whose file no longer
    decodes stays unverified (decided by the head) and is noted in ``unreadable``; an undecodable query
    raises ``ImageLoadError``."""
    keys = query_keypoints(query.image())
    for match in matches:
        try:
            theirs = extract(_indexed_file(match, files))
        except ImageLoadError as exc:
            _note(unreadable, match.source, str(exc))
            continue
        item = items[match.item_id]
        match.verification = verify_keypoints(keys, theirs, (query.size, (item.width, item.height)))
        match.decided_by = decided_by(match.head_score, threshold, match.verification)
        match.is_match = match.decided_by is not None


def _indexed_file(match: Match, files: dict[int, bytes]) -> bytes:
    """A match's file as it was indexed (``read_indexed``), read once per search into ``files``."""
    if match.item_id not in files:
        files[match.item_id] = read_indexed(match.source, match.sha256)
    return files[match.item_id]


def _note(unreadable: list[Skipped], source: str, reason: str) -> None:
    """Report a file that no longer decodes, once."""
    if all(skipped.source != source for skipped in unreadable):
        unreadable.append(Skipped(source, reason))


def _with_pictures(model: CatalogueModel, matches: list[Match], pictures: dict[int, Picture], files: dict[int, bytes],
                   unreadable: list[Skipped]) -> list[Match]:
    """The matches whose files decode (their pictures added to ``pictures``); the others are reported."""
    readable = []
    for match in matches:
        if match.item_id not in pictures:
            try:
                pictures[match.item_id] = model.load([_indexed_file(match, files)])[0]
            except ImageLoadError as exc:
                _note(unreadable, match.source, str(exc))
                continue
        readable.append(match)
    return readable


def _original_size(source: ImageSource, decoded: Picture) -> tuple[int, int]:
    """(width, height) of the original image (boxes are given in its pixels); the decoded copy may be reduced."""
    if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        try:
            return image_size(source)
        except ImageLoadError:
            pass
    return int(decoded.shape[1]), int(decoded.shape[0])


def _write_overlays(directory: Path, match: Match, query_image: Picture, match_image: Picture,
                    explanation: PairExplanation) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for suffix, (which, attribute) in OVERLAYS.items():
        image = query_image if which == "query" else match_image
        path = directory / f"{match.rank_after:02d}_item{match.item_id}_{suffix}.png"
        overlay(image, getattr(explanation, attribute)).save(path)
        written[suffix] = str(path)
    return written
