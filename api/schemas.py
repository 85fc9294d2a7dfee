"""Typed request and response bodies of the REST API (they make the OpenAPI document at ``/docs``).

Explanations are the engine's ``PairExplanation.to_dict()`` passed through: the fields below are those
the engine always gives; optional keys it may add (``effects``, ``correspondences``, ``concepts``, or
newer ones) appear as they come, because the explanation models allow extra keys.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from indexer.models import Decision, PairStatus, ReviewStatus

Map = list[list[float]]
DecidedBy = Literal["head", "geometry", "head and geometry"]
DECIDED_BY = ("Which evidence makes the pair a match: 'head' (similarity ≥ threshold), 'geometry' (verified), "
              "'head and geometry'; null for no match.")


class Verification(BaseModel):
    """The geometric verification of a pair (engine.explain.decision): SIFT matches one homography explains."""

    model: str = Field(description="The geometric model fitted ('homography').")
    inliers: int = Field(description="Tentative matches the fitted model explains: the evidence.")
    matches: int = Field(description="Tentative matches (ratio test, mutual nearest neighbours) it was fitted to.")
    mirrored: bool = Field(description="The matches were found between a mirror image of A and B.")
    verified: bool = Field(description="inliers ≥ min_inliers: the pair is a match whatever its similarity.")
    min_inliers: int
    lines: list[list[float]] = Field(description="For a verified pair, up to 30 inlier matches [xa, ya, xb, yb] in "
                                                 "each original image's pixels, spread over A; empty otherwise.")


class Explanation(BaseModel):
    """Why a pair scored as it did: the head's similarity, the decision, and four Grad-CAM maps."""

    model_config = ConfigDict(extra="allow")

    similarity: float = Field(description="The Siamese head's calibrated similarity in (0, 1).")
    is_match: bool = Field(description="The decision: similarity ≥ threshold, or geometrically verified.")
    threshold: float
    decision: str = Field(description="'match' or 'no match'.")
    decided_by: DecidedBy | None = Field(None, description=DECIDED_BY)
    verification: Verification | None = Field(None, description="The geometric verification, when one was run.")
    empty_maps: list[str] = Field(description="Maps that carry no evidence at all (returned as zeros).")
    factual_a: Map = Field(description="h×w in [0, 1] at feature resolution; a = the query / first image.")
    factual_b: Map
    counterfactual_a: Map
    counterfactual_b: Map
    effects: Any = Field(None, description="Optional, when the engine provides it.")
    correspondences: Any = Field(None, description="Optional, when the engine provides it.")
    concepts: Any = Field(None, description="Optional, when the engine provides it.")


class ExplanationWithOverlays(Explanation):
    """A cached explanation: its key and the URLs of its overlay PNGs."""

    explanation_key: str
    overlays: dict[str, str] = Field(description="Map name → overlay PNG URL.")


SOURCE = "The file's path relative to the folder that was indexed (the server's own paths stay on the server)."


class Unreadable(BaseModel):
    source: str = Field(description=SOURCE)
    reason: str


class SearchMatch(BaseModel):
    item_id: int
    source: str = Field(description=SOURCE)
    listing: str | None
    sha256: str
    index_similarity: float = Field(description="Cosine of the embeddings (negated L2 distance for the paper preset).")
    head_score: float = Field(description="The head's calibrated similarity: what the matches are ranked by.")
    is_match: bool = Field(description="head_score ≥ threshold, or (with verify) geometrically verified.")
    decided_by: DecidedBy | None = Field(None, description=DECIDED_BY)
    verification: Verification | None = Field(None, description="The geometric verification (with verify), else null.")
    rank_before: int = Field(description="1-based rank by index similarity among the candidates.")
    rank_after: int = Field(description="1-based rank by head score.")
    image_url: str
    explanation: Explanation | None = None
    explanation_key: str | None = None
    overlays: dict[str, str] = Field(default_factory=dict, description="Map name → overlay PNG URL (when explained).")


class SearchResponse(BaseModel):
    query: str = Field(description="The upload's file name, or the catalogue item's source (as in matches).")
    query_item: int | None = Field(description="The catalogue item searched with (item=), else null.")
    query_sha256: str
    query_image_url: str | None = Field(description="The query item's image; null for an upload.")
    k: int
    threshold: float
    n_candidates: int
    index_size: int = Field(description="Vectors in the index searched; 0 when nothing is indexed with the server's model.")
    excluded: list[int] = Field(description="Catalogue items that are the query itself (an upload's bytes, or the item), left out.")
    generation: int | None
    stale_index: bool
    unreadable: list[Unreadable]
    matches: list[SearchMatch]


class CompareResponse(ExplanationWithOverlays):
    """An explained comparison of two images (uploads or catalogue items)."""

    item_a: int | None
    item_b: int | None
    image_a_url: str
    image_b_url: str
    cached: bool = Field(description="True when the explanation came from the cache (no model call).")


class ItemResponse(BaseModel):
    id: int
    source: str = Field(description=SOURCE)
    listing: str | None
    sha256: str
    width: int
    height: int
    size_bytes: int
    embedded: bool
    added_at: datetime
    updated_at: datetime
    image_url: str


class ItemBrief(BaseModel):
    id: int
    source: str = Field(description=SOURCE)
    listing: str | None
    image_url: str


class ReviewCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_a: int = Field(ge=1)
    item_b: int = Field(ge=1)
    decision: Decision
    note: str | None = Field(None, max_length=4000)
    reviewer: str = Field("anonymous", min_length=1, max_length=256)

    @model_validator(mode="after")
    def _two_items(self) -> ReviewCreate:
        if self.item_a == self.item_b:
            raise ValueError("a review needs two different items")
        return self


class Review(BaseModel):
    id: int
    item_a: int = Field(description="The smaller item id of the pair.")
    item_b: int
    decision: Decision
    note: str | None
    reviewer: str
    created_at: datetime


class ReviewPage(BaseModel):
    offset: int
    limit: int
    total: int
    reviews: list[Review]


class DedupRunInfo(BaseModel):
    id: int
    created_at: datetime
    threshold: float
    threshold_source: str
    precision_target: float | None
    k: int
    n_items: int
    n_candidates: int
    n_pairs: int
    n_groups: int
    expected_false_pairs: float | None = Field(
        None, description="False pairs expected at the threshold: the model's per-pair false-match rate × the catalogue's pairs.")
    n_verify_checked: int | None = Field(None, description="Candidate pairs below the threshold verified geometrically (None: not asked).")
    n_verified: int | None = Field(None, description="Of those, how many verified: kept as duplicates whatever their score.")


class DedupRequest(BaseModel):
    """How to run dedup: a threshold, or a precision target (calibrated on the reviewers' decisions so far,
    else placed by the model's per-pair false-match rate for the catalogue's size); neither = the stored
    calibration of this model, else the false-match rate for precision 0.9."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, ge=0, le=1)
    precision: float | None = Field(None, gt=0, le=1)
    k: int = Field(10, ge=1, le=100, description="Neighbours per item in the candidate graph.")
    verify: bool = Field(True, description="Verify the candidate pairs just below the threshold geometrically; keep those verified.")


class DedupRunPage(BaseModel):
    offset: int
    limit: int
    total: int
    runs: list[DedupRunInfo] = Field(description="Newest first.")


class DedupRunOut(BaseModel):
    run: DedupRunInfo
    seconds: float


class DuplicatePairOut(BaseModel):
    id: int
    group_id: int
    item_a: ItemBrief
    item_b: ItemBrief
    index_similarity: float
    head_score: float
    exact: bool = Field(description="Byte-identical files.")
    verified: bool = Field(description="Geometrically verified: kept on that evidence, whatever its head score.")
    status: PairStatus
    review: Review | None = Field(description="The pair's newest review.")


class StatusCounts(BaseModel):
    unreviewed: int
    accepted: int
    rejected: int
    all: int


class DuplicatePage(BaseModel):
    run: DedupRunInfo | None = Field(description="The dedup run shown (the latest by default); None before any run.")
    status: ReviewStatus
    offset: int
    limit: int
    total: int = Field(description="Pairs with this status.")
    counts: StatusCounts
    pairs: list[DuplicatePairOut]


class DuplicateGroupOut(BaseModel):
    id: int
    size: int
    n_listings: int
    max_score: float
    items: list[int]


class GroupPage(BaseModel):
    run_id: int | None
    offset: int
    limit: int
    total: int
    groups: list[DuplicateGroupOut]


class ListingShareOut(BaseModel):
    listing_a: str
    listing_b: str
    n_pairs: int
    photos_a: int
    photos_b: int
    n_exact: int
    max_score: float
    mean_score: float


class ListingPage(BaseModel):
    run_id: int | None
    offset: int
    limit: int
    total: int
    listings: list[ListingShareOut]


class StoredUpload(BaseModel):
    filename: str | None = Field(description="The client's file name.")
    sha256: str
    path: str = Field(description="Where it is stored, relative to the upload folder (the item's source).")
    listing: str | None
    item_id: int | None = Field(description="None when the indexer skipped the file (see report.skipped).")
    image_url: str | None
    new_file: bool = Field(description="False when the same bytes were already stored under this listing.")


class IndexReportOut(BaseModel):
    source: str = Field(description="The name of the folder indexed (the upload folder).")
    scanned: int
    added: int
    updated: int
    touched: int
    unchanged: int
    removed: int
    exact_duplicates: int
    embedded: int
    recoded: int = Field(description="Items whose stored float16 projections this run converted to the model's compact "
                                     "descriptions (a catalogue indexed before the model had its description codec).")
    shards_swept: int = Field(description="Vector shard files no item pointed at (left by a killed run), deleted.")
    shards_compacted: int = Field(description="Small or mostly dead vector shards rewritten into larger ones.")
    embed_seconds: float
    skipped: list[Unreadable]
    generation: int | None
    index_factory: str | None
    index_action: str
    ntotal: int
    seconds: float
    images_per_second: float


class IndexResponse(BaseModel):
    stored: list[StoredUpload]
    report: IndexReportOut


class ModelInfo(BaseModel):
    preset: str
    backbone: str
    input_size: int
    embed_dim: int
    threshold: float = Field(description="Decision threshold of one pair (match / no match).")
    duplicate_threshold: float = Field(description="Where dedup draws the line without a stored calibration.")
    key: str = Field(description="Fingerprint of the model's config and weights.")


class IndexInfo(BaseModel):
    size: int
    generation: int | None
    stale: bool


class DatabaseInfo(BaseModel):
    ok: bool
    dialect: str
    error: str | None = None


class AuthInfo(BaseModel):
    reads: Literal["open", "token"]
    writes: Literal["token", "disabled"]


class Health(BaseModel):
    status: Literal["ok", "error"]
    version: str
    model: ModelInfo
    index: IndexInfo | None
    items: int | None
    db: DatabaseInfo
    auth: AuthInfo
